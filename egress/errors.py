"""Domain exceptions.

Exceptions mean a bad start-up input, a protocol violation, an I/O failure or a bug; a denied
connection is a normal return value, never one of these.
"""

from __future__ import annotations

from rules.problems import InvalidRuleSetError, Problem, value_repr

__all__ = ["ConfigError", "ConfigProblem", "EgressError", "value_repr"]


class EgressError(Exception):
    """Base class of every exception egress raises on purpose."""


ConfigProblem = Problem
"""One thing wrong with a config file: :class:`rules.problems.Problem`, the type every reader of
rules reports with, so a config file and a rule store describe a mistake the same way."""


class ConfigError(EgressError, InvalidRuleSetError):
    """A config file could not be used. Carries every problem found, not just the first (as
    :class:`rules.problems.InvalidRuleSetError` does for a rule set from anywhere)."""
