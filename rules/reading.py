"""Reading a tree of plain values (parsed TOML, JSON, a Redis hash) with exact problem reports.

One small reader (:class:`Table`) converts values, records problems instead of raising at the
first, and remembers which keys it was asked for, so unknown keys are found (with the nearest
valid key as a hint) without a second list of names to keep in sync. The config file reader and
the rule set reader (:mod:`rules.apps`) share it, so both say the same thing about the same
mistake.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, Final, TypeVar

from rules.problems import Problem, value_repr

__all__ = [
    "Reader",
    "RejectedError",
    "Table",
    "choice",
    "did_you_mean",
    "integer",
    "is_int",
    "non_empty_string",
    "positive_number",
    "secret_shown",
    "sha256_hex",
    "string_of",
    "tables_of",
    "via",
]

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


class RejectedError(Exception):
    """Raised by a converter: the value is not acceptable."""

    def __init__(self, expected: str, hint: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


class _Missing:
    pass


_MISSING: Final = _Missing()
_SHA256_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")


class Reader:
    """Collects the problems found in one source (a file, a store, a request)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.tables: list[Table] = []

    def report(
        self,
        key: str,
        value: object,
        expected: str,
        hint: str | None = None,
        *,
        shown: str | None = None,
    ) -> None:
        text = value_repr(value) if shown is None else shown
        self.problems.append(Problem(self.source, key, text, expected, hint))

    def root(
        self, data: Mapping[str, Any], *, path: str = "", name: str = "the top level"
    ) -> Table:
        return Table(self, data, path, name=name, present=True)

    def report_unknown_keys(self) -> None:
        """Report every key no reader asked for; the end of reading (the tables are let go, so
        the reader and its tables, which point at each other, are freed without the cycle
        collector)."""
        for table in self.tables:
            table.report_unknown_keys()
        self.tables.clear()


class Table:
    """One table being read. Every key asked for becomes a known key of the table."""

    def __init__(
        self, reader: Reader, data: Mapping[str, Any], path: str, *, name: str, present: bool
    ) -> None:
        self.reader = reader
        self.data = data
        self.path = path
        self.name = name
        self.present = present
        self.known: list[str] = []
        reader.tables.append(self)

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _take(self, key: str) -> Any:
        self.known.append(key)
        return self.data.get(key, _MISSING)

    def value(
        self,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        *,
        required: str | None = None,
        show: Callable[[Any], str] = value_repr,
    ) -> T:
        """The converted value of ``key``; ``default`` when absent or invalid (and reported).

        ``required`` is the text that says what was expected when the key is absent; ``show``
        renders a bad value for the report (to keep secrets out of it).
        """
        raw = self._take(key)
        if isinstance(raw, _Missing):
            if required is not None:
                self.reader.report(self.key_path(key), None, required, shown="nothing")
            return default
        try:
            return convert(raw)
        except RejectedError as invalid:
            self.reader.report(
                self.key_path(key), raw, invalid.expected, invalid.hint, shown=show(raw)
            )
            return default

    def entries(
        self,
        key: str,
        convert: Callable[[Any], T],
        *,
        expected: str,
        required: bool = False,
        non_empty: bool = False,
    ) -> list[tuple[str, T]] | None:
        """``(key path, value)`` for each valid item of the list at ``key``; ``None`` when
        absent or not a list. Each bad item is reported at its own ``key[i]`` path."""
        raw = self._take(key)
        path = self.key_path(key)
        if isinstance(raw, _Missing):
            if required:
                self.reader.report(path, None, expected, shown="nothing")
            return None
        if not isinstance(raw, list | tuple):
            hint = (
                f"write it as a list: [{json.dumps(raw)}]" if isinstance(raw, str | int) else None
            )
            self.reader.report(path, raw, expected, hint)
            return None
        if non_empty and not raw:
            self.reader.report(path, raw, expected)
        found: list[tuple[str, T]] = []
        for index, item in enumerate(raw):
            item_path = f"{path}[{index}]"
            try:
                found.append((item_path, convert(item)))
            except RejectedError as invalid:
                self.reader.report(item_path, item, invalid.expected, invalid.hint)
        return found

    def items(
        self, key: str, convert: Callable[[Any], T], default: tuple[T, ...], *, expected: str
    ) -> tuple[T, ...]:
        found = self.entries(key, convert, expected=expected)
        return default if found is None else tuple(value for _, value in found)

    def table(self, key: str, *, name: str | None = None) -> Table:
        """The sub-table at ``key``; an empty, not ``present`` one when absent or not a table."""
        raw = self._take(key)
        path = self.key_path(key)
        name = name or f"[{path}]"
        if isinstance(raw, Mapping):
            return Table(self.reader, raw, path, name=name, present=True)
        if not isinstance(raw, _Missing):
            self.reader.report(path, raw, "a table")
        return Table(self.reader, {}, path, name=name, present=False)

    def tables(self, key: str, *, name: str, expected: str) -> list[Table]:
        """The tables of an array of tables (``[[app]]``, or a list of inline tables)."""
        raw = self._take(key)
        path = self.key_path(key)
        if isinstance(raw, _Missing):
            return []
        return tables_of(self.reader, raw, path, name=name, expected=expected)

    def report_unknown_keys(self) -> None:
        for key, raw in self.data.items():
            if key in self.known:
                continue
            hint = did_you_mean(key, self.known)
            if hint is None and self.known:
                hint = "known keys: " + ", ".join(sorted(self.known))
            shown = f"unknown key {value_repr(key)}"
            self.reader.report(self.key_path(key), raw, f"a key of {self.name}", hint, shown=shown)


def tables_of(reader: Reader, raw: Any, path: str, *, name: str, expected: str) -> list[Table]:
    """The tables of a list of tables found at ``path`` (reported when it is not one)."""
    if isinstance(raw, Mapping):
        reader.report(path, raw, expected, f"write [[{path}]], not [{path}]")
        return []
    if not isinstance(raw, list | tuple):
        reader.report(path, raw, expected)
        return []
    found: list[Table] = []
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        if isinstance(item, Mapping):
            found.append(Table(reader, item, item_path, name=name, present=True))
        else:
            reader.report(item_path, item, "a table")
    return found


def did_you_mean(text: str, options: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(text, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def secret_shown(raw: object) -> str:
    """How a rejected secret is shown: its length only."""
    if isinstance(raw, str):
        return f"a {len(raw)}-character string (not shown)"
    return value_repr(raw)


# --- converters: Any -> T, raising RejectedError ---------------------------------------------


def is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def _quote_hint(raw: object) -> str | None:
    return "write numbers without quotes" if isinstance(raw, str) else None


def positive_number(expected: str) -> Callable[[Any], float]:
    def convert(raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise RejectedError(expected, _quote_hint(raw))
        if not math.isfinite(raw) or raw <= 0:
            raise RejectedError(expected)
        return float(raw)

    return convert


def integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def convert(raw: Any) -> int:
        if not is_int(raw):
            raise RejectedError(expected, _quote_hint(raw))
        if raw < low or (high is not None and raw > high):
            raise RejectedError(expected)
        return int(raw)

    return convert


def choice(options: type[E]) -> Callable[[Any], E]:
    values = [member.value for member in options]
    expected = "one of " + ", ".join(json.dumps(value) for value in values)

    def convert(raw: Any) -> E:
        if isinstance(raw, str):
            try:
                return options(raw)
            except ValueError:
                raise RejectedError(expected, did_you_mean(raw.lower(), values)) from None
        raise RejectedError(expected)

    return convert


def via(parse: Callable[[Any], T], expected: str) -> Callable[[Any], T]:
    """A converter from a parser that raises ``ValueError`` with a readable message."""

    def convert(raw: Any) -> T:
        try:
            return parse(raw)
        except ValueError as error:
            raise RejectedError(expected, str(error) or None) from None

    return convert


def string_of(parse: Callable[[str], T]) -> Callable[[Any], T]:
    def convert(raw: Any) -> T:
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return parse(raw)

    return convert


def sha256_hex(raw: Any) -> str:
    """A SHA-256 digest in hex (any case), returned in lower case."""
    if not isinstance(raw, str) or not _SHA256_HEX.fullmatch(raw):
        raise RejectedError(
            "64 hex characters (a SHA-256 digest)", "the digest of the secret, not the secret"
        )
    return raw.lower()


def non_empty_string(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise RejectedError("a non-empty string")
    return raw
