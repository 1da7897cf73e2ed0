"""The trigger that makes Patchwork's PostgreSQL say when an event is committed.

An ``AFTER INSERT`` trigger on ``patchwork_event`` calls ``pg_notify``; PostgreSQL
delivers the notification to every listener when the inserting transaction commits, in
commit order, and never for one that rolls back. The payload names the event (its id and
date) and nothing else: the bridge still reads every event from the API. Installing it
again replaces it; nothing here reads or writes Patchwork's rows.
"""

from __future__ import annotations

CHANNEL = "patchwork_bridge_events"
FUNCTION = "patchwork_bridge_notify"
TRIGGER = "patchwork_bridge_notify"
TABLE = "patchwork_event"

INSTALL = f"""\
-- patchwork-bridge: notify listeners of each event at commit (idempotent).
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object('id', NEW.id, 'date', NEW.date)::text);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {TRIGGER} ON {TABLE};
CREATE TRIGGER {TRIGGER} AFTER INSERT ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {FUNCTION}();
"""

UNINSTALL = f"""\
-- patchwork-bridge: remove the notification trigger (idempotent).
DROP TRIGGER IF EXISTS {TRIGGER} ON {TABLE};
DROP FUNCTION IF EXISTS {FUNCTION}();
"""

TRIGGER_EXISTS = (
    "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
    "WHERE t.tgname = %s AND c.relname = %s AND NOT t.tgisinternal"
)
"""Parameters: TRIGGER, TABLE."""
