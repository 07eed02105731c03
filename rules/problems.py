"""What is wrong with a rule set or a config, said precisely enough to fix at 3 a.m.

A :class:`Problem` names where (a file, a store, an API request), the key path
(``app[2].allow[0]``), the value found, what was expected and, when there is one, a hint such as
the nearest valid key. Every reader of rules -- the TOML file, a Redis store, the admin API, the
CLI -- reports through this one type, so an edit is refused with the same words wherever it
comes from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["VALUE_LIMIT", "InvalidRuleSetError", "Problem", "utf8_text", "value_repr"]

VALUE_LIMIT = 80
"""Longest rendering of an offending value in a :class:`Problem`, in characters."""


def value_repr(value: object, *, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters so one huge value cannot flood a report."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong.

    ``file`` says where the input came from (a path, ``"redis"``, ``"admin API"``); ``key`` is a
    dotted path with list indexes; ``value`` is already a display string (usually
    :func:`value_repr` of the offending value); ``expected`` says what would have been accepted;
    ``hint`` is an optional nudge such as "did you mean 'x'?".
    """

    file: str
    key: str
    value: str
    expected: str
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        text = f"{where}: got {self.value}; expected {self.expected}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class InvalidRuleSetError(ValueError):
    """Apps that cannot form a rule set. Carries every problem found, not just the first."""

    problems: tuple[Problem, ...]

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


def utf8_text(raw: bytes, source: str) -> str:
    """A file's bytes as text (a leading BOM dropped), or ``InvalidRuleSetError`` naming the
    first line that is not UTF-8: config files and import files are read the same way."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InvalidRuleSetError(
            [Problem(source, f"line {line}", "bytes that are not UTF-8", "UTF-8 text")]
        ) from None
