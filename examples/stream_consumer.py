"""A CI system reading patchwork-bridge's event stream: no public URL, no AMQP.

Needs only httpx and httpx-sse. Resumes after a restart from the id saved in STATE.
Settings: STREAM_URL (default http://localhost:9470), TOKEN_FILE, EVENTS (default #),
STATE (default last-event-id).
"""

import json
import os
import pathlib
import time

import httpx
from httpx_sse import connect_sse

URL = os.environ.get("STREAM_URL", "http://localhost:9470") + "/v1/events"
TOKEN = pathlib.Path(os.environ.get("TOKEN_FILE", "token")).read_text().strip()
saved = pathlib.Path(os.environ.get("STATE", "last-event-id"))
tmp = saved.with_name(saved.name + ".tmp")

headers = {"Authorization": f"Bearer {TOKEN}"}
while True:  # reconnect after any break: each event comes once across it
    if saved.exists():
        headers["Last-Event-ID"] = saved.read_text()
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=60)) as client,
            connect_sse(
                client,
                "GET",
                URL,
                params={"events": os.environ.get("EVENTS", "#")},
                headers=headers,
            ) as source,
        ):
            source.response.raise_for_status()
            for event in source.iter_sse():
                if not event.data:  # a keep-alive that another server or proxy ends oddly
                    continue
                if event.event == "gap":
                    print("missed events:", event.data, flush=True)
                    continue
                print(event.event, json.loads(event.data)["id"], flush=True)  # test it here
                tmp.write_text(event.id)  # after the work: a crash repeats one, never skips
                tmp.replace(saved)  # whole or not at all, even if killed mid-write
    except httpx.TransportError as exc:
        print("stream broken:", exc, flush=True)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code < 500:
            raise  # refused: the token, the patterns or the saved id is wrong
        print("stream unavailable:", exc.response.text.strip(), flush=True)  # the broker is busy
    time.sleep(3)
