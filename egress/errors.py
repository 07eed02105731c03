"""Domain exceptions.

Exceptions mean a bad start-up input, a protocol violation, an I/O failure or a bug; a denied
connection is a normal return value, never one of these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

VALUE_LIMIT = 80
"""Longest rendering of an offending value in a :class:`ConfigProblem`, in characters."""


class EgressError(Exception):
    """Base class of every exception egress raises on purpose."""


def value_repr(value: object, *, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters so one huge value cannot flood a report."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file.

    ``key`` is a dotted path with list indexes (``app[2].allow[0]``); ``value`` is already a
    display string (usually :func:`value_repr` of the offending value); ``expected`` says what
    would have been accepted; ``hint`` is an optional nudge such as "did you mean 'x'?".
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


class ConfigError(EgressError):
    """A config file could not be used. Carries every problem found, not just the first."""

    problems: tuple[ConfigProblem, ...]

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)
