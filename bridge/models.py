"""Pydantic models of the event bodies Patchwork's `/api/events/` sends (API 1.3 and later).

The one source of truth for the consumer contract: `python -m bridge.schema --write`
turns these models into `schemas/*.json`, and the producer validates every event
against them before publishing. They mirror Patchwork's serializers
(`patchwork/api/event.py` and `patchwork/api/embedded.py`) and the responses
recorded from a real Patchwork in `bridge/demo/data/events/`.

Rules: every field Patchwork sends is required; types are strict (`"1"` is not an
int, `true` is not an int); a field is nullable only where Patchwork sends null;
unknown fields are allowed, since Patchwork adds fields in new API versions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# Patchwork runs with USE_TZ=False: dates are naive server-local time, e.g.
# "2026-11-24T13:14:28.163041", and the fraction is left out when it is zero. So they are
# not RFC 3339 ("format": "date-time" would reject them); the bus' ce-time carries the offset.
NaiveDate = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?$",
        description="Naive server-local time (Patchwork's TIME_ZONE), ISO 8601 without a zone.",
    ),
]
# An absolute URL Patchwork builds from the request; "format" documents it, nothing enforces it.
Url = Annotated[str, Field(json_schema_extra={"format": "uri"})]


class PatchworkObject(BaseModel):
    """Common configuration: strict types, extra fields kept (Patchwork may add some)."""

    model_config = ConfigDict(
        strict=True, extra="allow", frozen=True, use_attribute_docstrings=True
    )


# -- embedded objects (patchwork/api/embedded.py) ----------------------------------------------


class Project(PatchworkObject):
    """The project an event belongs to; `link_name` is the first word of the routing key."""

    id: int
    url: Url
    name: str
    link_name: str
    """Short name used in URLs and routing keys, e.g. `netdevbpf`."""
    list_id: str
    list_email: str
    web_url: str
    """May be empty, like the other URL settings of a project."""
    scm_url: str
    webscm_url: str
    list_archive_url: str
    list_archive_url_format: str
    commit_url_format: str


class User(PatchworkObject):
    """A Patchwork account: the actor of an event or a patch's delegate."""

    id: int
    url: Url
    username: str
    first_name: str
    last_name: str
    email: str


class _Submission(PatchworkObject):
    id: int
    url: Url
    web_url: Url
    msgid: str
    """The Message-ID of the mail, with its angle brackets."""
    list_archive_url: str | None
    """Null unless the project configures a list archive URL format."""
    date: NaiveDate
    name: str
    """The mail's subject, with its [PATCH ...] prefix turned into [v2,1/4]."""
    mbox: Url
    """The mail as an mbox; a patch's mbox with `?series=*` includes its predecessors."""


class Patch(_Submission):
    """A patch as events embed it (not the full patch: fetch `url` for diff and headers)."""


class Cover(_Submission):
    """A series' cover letter as events embed it."""


class Series(PatchworkObject):
    """A series as events embed it; `mbox` holds all of its patches."""

    id: int
    url: Url
    web_url: Url
    date: NaiveDate
    name: str | None
    """Null when Patchwork could not name the series (no cover letter, no subject)."""
    version: int
    mbox: Url


class Check(PatchworkObject):
    """A CI result reported on a patch."""

    id: int
    url: Url
    date: NaiveDate
    state: Literal["pending", "success", "warning", "fail"]
    target_url: str | None
    """Where the CI's details are; null when the reporter gave none."""
    context: str
    """Which CI job reported, e.g. `kernelci-build`."""


class Comment(PatchworkObject):
    """A reply to a patch or cover letter (API 1.3 on)."""

    id: int
    url: Url
    web_url: Url
    msgid: str
    list_archive_url: str | None
    date: NaiveDate


# -- payloads, one per category (EventSerializer._category_map) ---------------------------------


class CoverCreatedPayload(PatchworkObject):
    cover: Cover


class PatchCreatedPayload(PatchworkObject):
    patch: Patch


class PatchCompletedPayload(PatchworkObject):
    patch: Patch
    series: Series


class PatchStateChangedPayload(PatchworkObject):
    patch: Patch
    previous_state: str | None
    """State slug, e.g. `new`; states are configurable, so any slug may appear."""
    current_state: str | None
    """State slug, e.g. `accepted`."""


class PatchDelegatedPayload(PatchworkObject):
    patch: Patch
    previous_delegate: User | None
    """Null when the patch had no delegate."""
    current_delegate: User | None
    """Null when the patch was un-delegated."""


class PatchRelationChangedPayload(PatchworkObject):
    patch: Patch
    previous_relation: None
    """Always null: Patchwork's serializer does not render relations (a stub upstream)."""
    current_relation: None
    """Always null, as `previous_relation`."""


class CheckCreatedPayload(PatchworkObject):
    patch: Patch
    check: Check


class SeriesCreatedPayload(PatchworkObject):
    series: Series


class SeriesCompletedPayload(PatchworkObject):
    series: Series


class CoverCommentCreatedPayload(PatchworkObject):
    cover: Cover
    comment: Comment


class PatchCommentCreatedPayload(PatchworkObject):
    patch: Patch
    comment: Comment


# -- events ---------------------------------------------------------------------------------


class EventItem(PatchworkObject):
    """Any event: the envelope every category shares. Unknown categories are valid events."""

    id: int
    """Unique and increasing in insert order (not in date order)."""
    category: str
    project: Project
    date: NaiveDate
    actor: User | None
    """Who caused the event; null when it came from mail parsing."""
    payload: dict[str, object]
    """Keys depend on the category."""


class CoverCreatedEvent(EventItem):
    """A cover letter arrived."""

    category: Literal["cover-created"]
    payload: CoverCreatedPayload


class PatchCreatedEvent(EventItem):
    """A patch arrived; its series may still be incomplete."""

    category: Literal["patch-created"]
    payload: PatchCreatedPayload


class PatchCompletedEvent(EventItem):
    """A patch and all earlier patches of its series have arrived."""

    category: Literal["patch-completed"]
    payload: PatchCompletedPayload


class PatchStateChangedEvent(EventItem):
    """A maintainer changed a patch's state."""

    category: Literal["patch-state-changed"]
    payload: PatchStateChangedPayload


class PatchDelegatedEvent(EventItem):
    """A patch's delegate changed."""

    category: Literal["patch-delegated"]
    payload: PatchDelegatedPayload


class PatchRelationChangedEvent(EventItem):
    """A patch's related patches changed."""

    category: Literal["patch-relation-changed"]
    payload: PatchRelationChangedPayload


class CheckCreatedEvent(EventItem):
    """A CI reported a check on a patch."""

    category: Literal["check-created"]
    payload: CheckCreatedPayload


class SeriesCreatedEvent(EventItem):
    """A new series started; its patches are still arriving."""

    category: Literal["series-created"]
    payload: SeriesCreatedPayload


class SeriesCompletedEvent(EventItem):
    """Every patch of a series has arrived: what a CI tests. May fire twice for one series."""

    category: Literal["series-completed"]
    payload: SeriesCompletedPayload


class CoverCommentCreatedEvent(EventItem):
    """A reply to a cover letter arrived (or was edited, which is a new event)."""

    category: Literal["cover-comment-created"]
    payload: CoverCommentCreatedPayload


class PatchCommentCreatedEvent(EventItem):
    """A reply to a patch arrived (or was edited, which is a new event)."""

    category: Literal["patch-comment-created"]
    payload: PatchCommentCreatedPayload


EVENT_MODELS: dict[str, type[EventItem]] = {
    "cover-created": CoverCreatedEvent,
    "patch-created": PatchCreatedEvent,
    "patch-completed": PatchCompletedEvent,
    "patch-state-changed": PatchStateChangedEvent,
    "patch-delegated": PatchDelegatedEvent,
    "patch-relation-changed": PatchRelationChangedEvent,
    "check-created": CheckCreatedEvent,
    "series-created": SeriesCreatedEvent,
    "series-completed": SeriesCompletedEvent,
    "cover-comment-created": CoverCommentCreatedEvent,
    "patch-comment-created": PatchCommentCreatedEvent,
}
"""The 11 categories Patchwork 1.3+ emits, each with the model of its event body."""

OBJECT_MODELS: dict[str, type[PatchworkObject]] = {
    "project": Project,
    "user": User,
    "patch": Patch,
    "cover": Cover,
    "series": Series,
    "check": Check,
    "comment": Comment,
}
"""The objects events embed, by the name of their schema file."""
