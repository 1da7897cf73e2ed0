"""Operator files of ``[[table]]`` entries (subscriptions, stream consumers): read once,
every problem reported on its own line naming file, entry and key, never a secret."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from bridge.settings import SettingsError

_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on


class Problems:
    """One line per problem: ``<file>: <kind> <name>: <key>: <what is wrong>``."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.lines: list[str] = []

    def add(self, label: str, key: str, message: str) -> None:
        # A quoted TOML key may hold a line break: escape it so one problem stays one line.
        key = "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in key)
        self.lines.append(f"{self.path}: {self.kind} {label}: {key}: {message}")

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


def is_one_word(token: str) -> bool:
    return bool(token) and not any(c.isspace() or ord(c) < 32 for c in token)


def error_key(loc: tuple[int | str, ...]) -> str:
    key = str(loc[0]) if loc else "?"
    return key + "".join(f"[{part}]" for part in loc[1:])


def error_message(message: str) -> str:
    return message.removeprefix("Value error, ")
