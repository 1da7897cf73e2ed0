"""Operator files of ``[[table]]`` entries (subscriptions, stream consumers): read once by one
loader, every problem reported on its own line naming file, entry and key, never a secret.

``load_entries`` does what every such file needs (unknown keys, names given twice, secrets
read from ``*_file`` keys relative to the file, the model's own checks); the caller adds
its own checks of each entry and of the file as a whole.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bridge.settings import SettingsError

M = TypeVar("M", bound=BaseModel)

_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on


class Problems:
    """One line per problem: ``<file>: <kind> <name>: <key>: <what is wrong>``."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.lines: list[str] = []
        self._said: set[tuple[str, str]] = set()

    def add(self, label: str, key: str, message: str) -> None:
        self._said.add((label, key))
        # A quoted TOML key may hold a line break: escape it so one problem stays one line.
        key = "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in key)
        self.lines.append(f"{self.path}: {self.kind} {label}: {key}: {message}")

    def said(self, label: str, key: str) -> bool:
        """Whether a problem of that entry's key was reported already."""
        return (label, key) in self._said

    def raise_any(self) -> None:
        if self.lines:
            raise SettingsError("\n".join(self.lines))


def read_tables(path: Path, kind: str, what: str) -> tuple[list[dict[str, Any]], Problems]:
    """The ``[[kind]]`` tables of a TOML file; SettingsError if it cannot be read at all.

    ``what`` names the file's content in messages ("subscriptions", "stream consumers").
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give a position, never the text found there.
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None

    problems = Problems(path, kind)
    for key in sorted(set(data) - {kind}):
        problems.lines.append(f"{path}: {key}: unknown key, {what} are [[{kind}]] tables")
    tables = data.get(kind, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.lines.append(f"{path}: {kind}: must be [[{kind}]] tables")
        tables = []
    return tables, problems


def label_of(table: dict[str, Any], index: int) -> str:
    """How a problem names an entry: its name if it has a usable one, else its number."""
    name = table.get("name")
    if isinstance(name, str) and re.fullmatch(r"[a-z0-9-]+", name):
        return repr(name)
    return f"#{index}"


def read_secret_file(path: Path, label: str, key: str, problems: Problems) -> str | None:
    try:
        content = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        problems.add(label, key, f"cannot read {path} ({exc.strerror})")
        return None
    except UnicodeDecodeError:
        problems.add(label, key, f"{path} is not UTF-8 text")
        return None
    if not content:
        problems.add(label, key, f"{path} is empty")
        return None
    return content


def resolve(value: str, base: Path) -> Path:
    """A path from the file, relative ones taken from the file's directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


NOT_ONE_WORD = "must be one word, without spaces or control characters"


def is_one_word(token: str) -> bool:
    return bool(token) and not any(c.isspace() or ord(c) < 32 for c in token)


def error_key(loc: tuple[int | str, ...]) -> str:
    key = str(loc[0]) if loc else "?"
    return key + "".join(f"[{part}]" for part in loc[1:])


def error_message(message: str) -> str:
    return message.removeprefix("Value error, ")


@dataclass(slots=True)
class Entry:
    """One table while it is loaded: as written, and its values with secrets read."""

    label: str
    table: dict[str, Any]
    values: dict[str, Any]

    def given_by(self, key: str) -> str:
        """The key the operator wrote for ``key``'s value: ``key`` or ``key_file``."""
        return f"{key}_file" if f"{key}_file" in self.table else key


def load_entries(
    path: Path,
    kind: str,
    what: str,
    model: type[M],
    *,
    secret_files: Mapping[str, str],
    check: Callable[[Entry, Problems], None] | None = None,
    check_loaded: Callable[[M, Entry, Problems], None] | None = None,
) -> tuple[list[M], Problems]:
    """The ``[[kind]]`` entries of ``path`` that have no problem, and the problems found.

    ``secret_files`` maps a file key to the key it gives (``secret_file`` -> ``secret``):
    either may be set, not both; the file is read here. ``check`` looks at an entry's values
    before the model does, ``check_loaded`` at the model after. The caller raises.
    """
    tables, problems = read_tables(path, kind, what)
    loaded: list[M] = []
    first: dict[str, int] = {}
    for index, table in enumerate(tables, start=1):
        entry = Entry(label_of(table, index), table, dict(table))
        name = table.get("name")
        if isinstance(name, str):
            if name in first:
                problems.add(entry.label, "name", f"duplicate name (also {kind} #{first[name]})")
                continue
            first[name] = index
        before = len(problems.lines)
        for key in sorted(set(entry.values) - set(model.model_fields)):
            problems.add(entry.label, key, "unknown key")
            del entry.values[key]
        _read_secrets(entry, path.parent, secret_files, problems)
        if check is not None:
            check(entry, problems)
        try:
            item = model.model_validate(entry.values)
        except ValidationError as exc:
            for error in exc.errors(include_input=False, include_url=False):
                key = error_key(error["loc"])
                if not problems.said(entry.label, key):  # else said, in the operator's words
                    problems.add(entry.label, key, error_message(error["msg"]))
            continue
        if check_loaded is not None:
            check_loaded(item, entry, problems)
        if len(problems.lines) == before:
            loaded.append(item)
    return loaded, problems


def _read_secrets(
    entry: Entry, base: Path, secret_files: Mapping[str, str], problems: Problems
) -> None:
    values = entry.values
    for file_key, value_key in secret_files.items():
        if file_key in values and value_key in values:
            problems.add(entry.label, file_key, f"set either {value_key} or {file_key}, not both")
        elif isinstance(values.get(file_key), str):
            values[file_key] = resolve(values[file_key], base)
            content = read_secret_file(values[file_key], entry.label, file_key, problems)
            if content is not None:
                values[value_key] = content
