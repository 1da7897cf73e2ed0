"""The Patchwork double's store: events as Patchwork keeps them, built from the recordings.

Items are rendered once per (category, project) and split around their id and date,
so a backlog of 20,000 costs little. An event may be stored hidden and made visible
later (a transaction that commits after newer ones were read), and ids may be burned
(a transaction that rolled back). ``FakePatchwork`` serves this store over HTTP.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

# Every URL in the recordings starts with this root; it is rewritten to the double's own.
RECORDED_ROOT = "http://127.0.0.1:8000"
RECORDED_VERSION = "1.4"
CATEGORIES = (
    "cover-created",
    "patch-created",
    "patch-completed",
    "patch-state-changed",
    "patch-delegated",
    "patch-relation-changed",
    "check-created",
    "series-created",
    "series-completed",
    "cover-comment-created",
    "patch-comment-created",
)
COMMENT_CATEGORIES = frozenset({"cover-comment-created", "patch-comment-created"})
# Sentinels rendered into a template so an item's bytes can be split around its id and date.
_ID_MARK, _DATE_MARK = "\x00id\x00", "\x00date\x00"


_EVENT_CHECK_FIELDS = ("id", "url", "date", "state", "target_url", "context")
_PROJECT_LIST_ONLY = frozenset({"maintainers", "subject_match", "show_dependencies"})


def render(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as Django REST framework's JSONRenderer writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _load(name: str, api_version: str) -> Any:
    text = resources.files("bridge.demo").joinpath("data", name).read_text(encoding="utf-8")
    return json.loads(text.replace(f"/api/{RECORDED_VERSION}/", f"/api/{api_version}/"))


def _date_text(date: datetime) -> str:
    # DRF renders with isoformat(): no zone, and no fraction when microsecond is 0.
    return date.isoformat()


@dataclass(slots=True)
class StoredItem:
    """One stored item: its sort key, its served bytes and what the filters look at."""

    key: tuple[datetime, int]
    body: bytes
    project: str | None
    category: str | None
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class _Shape:
    """A category's item for one project, rendered once and split around id and date."""

    head: bytes
    middle: bytes
    tail: bytes

    def build(self, event_id: int, date: str) -> bytes:
        return b"".join((self.head, str(event_id).encode(), self.middle, render(date), self.tail))


class EventStore:
    def __init__(
        self,
        *,
        tz: str = "Australia/Canberra",
        api_version: str = "1.3",
        projects: Sequence[str] = ("netdevbpf", "linux-kselftest", "dpdk"),
        public_url: str | None = None,
    ) -> None:
        self._tz = ZoneInfo(tz)
        self.api_version = api_version
        self._public_url = public_url.rstrip("/") if public_url else None
        self._root = self._public_url or RECORDED_ROOT
        self._templates = {
            path.name.removesuffix(".json"): _load(f"events/{path.name}", api_version)
            for path in resources.files("bridge.demo").joinpath("data", "events").iterdir()
            if path.name.endswith(".json")
        }
        self._series = _load("series-detail.json", api_version)
        self._patch = _load("patch-detail.json", api_version)
        self._api_root = _load("api-root.json", api_version)
        self._project_list: list[dict[str, Any]] = _load("projects-list.json", api_version)
        self._projects: dict[str, dict[str, Any]] = {}
        for link_name in projects:
            self._project(link_name)
        self._round_robin = itertools.cycle(list(self._projects))
        self._shapes: dict[tuple[str, str], _Shape] = {}
        self._next_id = 1
        self._seq = itertools.count()
        self._keys: list[tuple[datetime, int]] = []  # visible items, sorted by (date, insertion)
        self._visible: list[StoredItem] = []
        self._by_id: dict[int, StoredItem] = {}
        self._hidden: dict[int, StoredItem] = {}
        self._raw: list[StoredItem] = []

    def now(self) -> datetime:
        """The server's wall clock: naive local time in its TIME_ZONE, as Patchwork stores it."""
        now = datetime.now(self._tz).replace(tzinfo=None)
        # Keep the fraction visible: isoformat() drops it when microsecond is 0.
        return now if now.microsecond else now.replace(microsecond=1)

    def add_event(
        self,
        category: str = "patch-created",
        project: str | None = None,
        date: datetime | None = None,
        *,
        visible: bool = True,
    ) -> dict[str, Any]:
        """Insert one event built from the recorded one of ``category``; returns it as served.

        ``visible=False`` keeps it out of the API until ``make_visible(id)``: a slow
        transaction that commits an older ``date`` after newer events were read.
        """
        item = self._insert(category, project, date, visible)
        return json.loads(item.body)

    def add_events(self, n: int, **kw: Any) -> list[dict[str, Any]]:
        """``add_event`` n times, sorting the store once; for 20,000-event backlogs."""
        visible = kw.pop("visible", True)
        items = [self._insert(visible=False, **kw) for _ in range(n)]
        if visible:
            self.make_visible(*(item.event_id for item in items if item.event_id is not None))
        return [json.loads(item.body) for item in items]

    def add_raw_item(self, item: Any, date: str) -> None:
        """Serve ``item`` (anything JSON, e.g. missing ``id``) in the position of ``date``."""
        project = category = None
        if isinstance(item, dict):
            project_obj = item.get("project")
            project = project_obj.get("link_name") if isinstance(project_obj, dict) else None
            category = item.get("category")
        when = datetime.fromisoformat(date)
        if when.tzinfo is not None:
            raise ValueError(f"Patchwork dates are naive server-local time, got {date!r}")
        body = render(item).replace(RECORDED_ROOT.encode(), self._root.encode())
        stored = StoredItem((when, next(self._seq)), body, project, category)
        self._raw.append(stored)
        self._show(stored)

    def make_visible(self, *ids: int) -> None:
        items = sorted((self._hidden.pop(event_id) for event_id in ids), key=lambda i: i.key)
        if self._keys and items and items[0].key < self._keys[-1]:
            for item in items:
                self._show(item)
        else:  # the common bulk case: all newer than what is served, append in one go
            self._keys.extend(item.key for item in items)
            self._visible.extend(items)

    def burn_ids(self, n: int = 1) -> list[int]:
        """Take ``n`` ids that never become visible: a transaction that rolled back."""
        burned = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        return burned

    def item_bytes(self, event_id: int) -> bytes:
        """The exact bytes of that item inside a served page."""
        return self._by_id[event_id].body

    def _insert(
        self,
        category: str = "patch-created",
        project: str | None = None,
        date: datetime | None = None,
        visible: bool = True,
    ) -> StoredItem:
        link_name = project if project is not None else next(self._round_robin)
        self._project(link_name)
        if date is None:
            date = self.now()
        elif date.tzinfo is not None:
            date = date.astimezone(self._tz).replace(tzinfo=None)
        event_id, self._next_id = self._next_id, self._next_id + 1
        body = self._shape(category, link_name).build(event_id, _date_text(date))
        item = StoredItem((date, next(self._seq)), body, link_name, category, event_id)
        self._by_id[event_id] = item
        if visible:
            self._show(item)
        else:
            self._hidden[event_id] = item
        return item

    def add_check_event(self, project: str, patch_id: int, check: dict[str, Any]) -> None:
        """The ``check-created`` event Patchwork writes when a check is created."""
        template = self._templates["check-created"]
        patch = template["payload"]["patch"]
        root = f"{self._root}/api/{self.api_version}"
        event_id, self._next_id = self._next_id, self._next_id + 1
        date = self.now()
        item = {
            **template,
            "id": event_id,
            "project": self._project(project),
            "date": _date_text(date),
            "payload": {
                "patch": {**patch, "id": patch_id, "url": f"{root}/patches/{patch_id}/"},
                "check": {
                    k: check[k] for k in ("id", "url", "date", "state", "target_url", "context")
                },
            },
        }
        body = render(item).replace(RECORDED_ROOT.encode(), self._root.encode())
        stored = StoredItem((date, next(self._seq)), body, project, "check-created", event_id)
        self._by_id[event_id] = stored
        self._show(stored)

    def _show(self, item: StoredItem) -> None:
        index = bisect.bisect_right(self._keys, item.key)
        self._keys.insert(index, item.key)
        self._visible.insert(index, item)

    def _project(self, link_name: str) -> dict[str, Any]:
        """The project object events embed; projects not in the recordings are made up."""
        if link_name not in self._projects:
            known = {p["link_name"]: p for p in self._project_list}
            if link_name not in known:
                new_id = max(p["id"] for p in self._project_list) + 1
                base = self._project_list[0]
                known[link_name] = {
                    **base,
                    "id": new_id,
                    "url": f"{RECORDED_ROOT}/api/{self.api_version}/projects/{new_id}/",
                    "name": link_name,
                    "link_name": link_name,
                    "list_id": f"{link_name}.lists.example.org",
                    "list_email": f"{link_name}@lists.example.org",
                }
                self._project_list.append(known[link_name])
            self._projects[link_name] = {
                k: v for k, v in known[link_name].items() if k not in _PROJECT_LIST_ONLY
            }
        return self._projects[link_name]

    def _shape(self, category: str, link_name: str) -> _Shape:
        shape = self._shapes.get((category, link_name))
        if shape is None:
            # An unknown category is a normal event: the patch-created one, renamed.
            template = self._templates.get(category, self._templates["patch-created"])
            old_link = template["project"]["link_name"]
            payload = render(template["payload"]).decode()
            payload = payload.replace(f"/project/{old_link}/", f"/project/{link_name}/")
            item = {
                **template,
                "id": _ID_MARK,
                "category": category,
                "project": self._projects[link_name],
                "date": _DATE_MARK,
                "payload": json.loads(payload),
            }
            text = render(item).replace(RECORDED_ROOT.encode(), self._root.encode())
            head, rest = text.split(render(_ID_MARK))
            middle, tail = rest.split(render(_DATE_MARK))
            shape = self._shapes[(category, link_name)] = _Shape(head, middle, tail)
        return shape

    def _rebase(self, root: str) -> None:
        """Point every stored URL at ``root``: items may be added before the port is known."""
        old, new = f"{self._root}/".encode(), f"{root}/".encode()
        if old != new:
            for item in itertools.chain(self._by_id.values(), self._raw):
                item.body = item.body.replace(old, new)
            self._shapes.clear()
        self._root = root
