"""The Patchwork double's checks API, as Patchwork has it: ``GET`` and ``POST
/api/<v>/patches/<id>/checks/`` with Token auth; 403 for a user who does not maintain the
patch's project; 201 with the created check, whose ``check-created`` event then appears
in ``/events/``. Faults for the next POSTs: a status (500, 503 with Retry-After) or
``hang``."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from bridge.demo.patchwork_store import render

_NO_CREDENTIALS = {"detail": "Authentication credentials were not provided."}
_FORBIDDEN = {"detail": "You do not have permission to perform this action."}
STATES = ("pending", "success", "warning", "fail")


class Site(Protocol):
    """What the checks API needs of the double it is part of."""

    @property
    def url(self) -> str: ...

    def now(self) -> datetime: ...

    def add_check_event(self, project: str, patch_id: int, check: dict[str, Any]) -> None: ...


@dataclass
class FakeChecks:
    fake: Site
    maintainers: Mapping[str, set[str]]
    """Token -> link names of the projects its user maintains."""
    patch_projects: dict[int, str] = field(default_factory=dict)
    """A patch's project; patches not named here are netdevbpf's, as recorded."""
    checks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    faults: deque[str] = field(default_factory=deque)
    posts: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def routes(self, app: web.Application, api: str) -> None:
        app.router.add_get(api + "/patches/{id:[0-9]+}/checks/", self._list)
        app.router.add_post(api + "/patches/{id:[0-9]+}/checks/", self._create)

    def fail_next(self, *faults: str) -> None:
        self.faults.extend(faults)

    def project_of(self, patch_id: int) -> str:
        return self.patch_projects.get(patch_id, "netdevbpf")

    async def _list(self, request: web.Request) -> web.Response:
        patch_id = int(request.match_info["id"])
        return web.json_response(self.checks.get(patch_id, []))

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        if self.faults:
            fault = self.faults.popleft()
            if fault == "hang":
                await asyncio.sleep(3600)
            headers = {"Retry-After": "1"} if fault == "503" else {}
            return web.json_response({"detail": "fault"}, status=int(fault), headers=headers)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Token" or token not in self.maintainers:
            return web.json_response(_NO_CREDENTIALS if not token else _FORBIDDEN, status=403)
        patch_id = int(request.match_info["id"])
        project = self.project_of(patch_id)
        if project not in self.maintainers[token]:
            return web.json_response(_FORBIDDEN, status=403)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"detail": "JSON parse error"}, status=400)
        errors = _invalid(body)
        if errors:
            return web.json_response(errors, status=400)
        check_id = next(self._ids)
        root = f"{self.fake.url}/api/{request.match_info['version']}"
        check = {
            "id": check_id,
            "url": f"{root}/patches/{patch_id}/checks/{check_id}/",
            "user": {"id": 1, "username": "maint"},
            "date": self.fake.now().isoformat(),
            "state": body["state"],
            "target_url": body.get("target_url"),
            "context": body["context"],
            "description": body.get("description"),
        }
        self.checks.setdefault(patch_id, []).append(check)
        self.fake.add_check_event(project, patch_id, check)
        return web.Response(body=render(check), status=201, content_type="application/json")


def _invalid(body: Any) -> dict[str, list[str]]:
    if not isinstance(body, dict):
        return {"non_field_errors": ["Invalid data."]}
    errors = {}
    if body.get("state") not in STATES:
        errors["state"] = [f'"{body.get("state")}" is not a valid choice.']
    if not isinstance(body.get("context"), str) or not body["context"]:
        errors["context"] = ["This field is required."]
    if len(str(body.get("target_url") or "")) > 200:
        errors["target_url"] = ["Ensure this field has no more than 200 characters."]
    return errors
