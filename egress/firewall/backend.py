"""What a firewall backend does, and the save-format parsing every backend shares.

A backend reads one (family, table) as ``*-save -c`` prints it and applies a list of
:class:`Op` to it in one atomic commit. Both backends read through the save format: it is the
operator's view (what ``iptables-save`` shows is what we compare), and it is fast (one
``iptables-legacy-save`` of 1,000 rules takes ~10 ms, a libiptc walk of the same ~400 ms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from egress.errors import EgressError
from egress.firewall.plan import CHAIN_PREFIX, Family, Table

__all__ = [
    "Backend",
    "BackendError",
    "ChainRule",
    "ConflictError",
    "Op",
    "TableState",
    "parse_save",
]


class BackendError(EgressError):
    """A backend could not read or write the firewall; the message says what to do."""


class ConflictError(BackendError):
    """The kernel's rules changed between our read and our commit (another instance, an
    operator); the caller re-reads and retries."""


@dataclass(frozen=True, slots=True)
class ChainRule:
    """One rule read back: the line as saved (``-A CHAIN ...``) and its counters."""

    line: str
    packets: int = 0
    bytes: int = 0


@dataclass(slots=True)
class TableState:
    """Our part of one table as read back, plus the built-in OUTPUT chain (to find our jumps).

    ``chains`` holds only chains named ``EGRESS-*`` (ours), each in kernel order.
    """

    family: Family
    table: Table
    chains: dict[str, list[ChainRule]] = field(default_factory=dict)
    output: list[ChainRule] = field(default_factory=list)

    def lines(self, chain: str) -> list[str]:
        return [rule.line for rule in self.chains.get(chain, [])]

    def jumps(self) -> list[tuple[int, str]]:
        """(1-based position, spec) of every OUTPUT rule that jumps to one of our chains."""
        found = []
        for index, rule in enumerate(self.output, start=1):
            target = _target_of(rule.line)
            if target is not None and target.startswith(CHAIN_PREFIX):
                found.append((index, rule.line.removeprefix("-A OUTPUT ")))
        return found

    def layout(self) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[int, str], ...]]:
        """What a diff depends on (our chains' lines and the jumps), without counters: two
        reads with the same layout would produce the same edits."""
        chains = tuple(sorted((name, tuple(self.lines(name))) for name in self.chains))
        return chains, tuple(self.jumps())

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values()) + len(self.jumps())


_COUNTED: Final = re.compile(r"\[(\d+):(\d+)\] (-A .*)")
_TARGET: Final = re.compile(r" -[jg] (\S+)")


def _target_of(line: str) -> str | None:
    match = _TARGET.search(line)
    return None if match is None else match[1]


def parse_save(text: str, family: Family, table: Table) -> TableState:
    """Parse ``*-save [-c] -t TABLE`` output into a :class:`TableState`.

    Comment lines (``# ...``, including the nft variant's "legacy tables present" warning) are
    skipped; other tables in the text are ignored.
    """
    state = TableState(family, table)
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            continue
        if current != table:
            continue
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name.startswith(CHAIN_PREFIX):
                state.chains.setdefault(name, [])
            continue
        packets = size = 0
        counted = _COUNTED.fullmatch(line)
        if counted is not None:
            packets, size, line = int(counted[1]), int(counted[2]), counted[3]
        if not line.startswith("-A "):
            continue
        chain = line.split(" ", 2)[1]
        rule = ChainRule(line, packets, size)
        if chain == "OUTPUT":
            state.output.append(rule)
        elif chain.startswith(CHAIN_PREFIX):
            state.chains.setdefault(chain, []).append(rule)
    return state


@dataclass(frozen=True, slots=True)
class Op:
    """One change to a table, applied in list order within one commit.

    - ``declare``: create the chain, or flush it if it exists (``:CHAIN - [0:0]``);
    - ``append``/``insert``: add ``spec`` at the end / at 1-based ``position``;
    - ``delete``: remove the rule at 1-based ``position``, or (``position`` None) the first rule
      equal to ``spec`` -- by content, so a concurrent change makes the commit fail rather than
      delete the wrong rule;
    - ``delete_chain``: remove an (empty, unreferenced) chain.
    """

    kind: Literal["declare", "append", "insert", "delete", "delete_chain"]
    chain: str
    spec: str = ""
    position: int | None = None

    def restore_line(self) -> str:
        """This op in ``iptables-restore`` syntax."""
        if self.kind == "declare":
            return f":{self.chain} - [0:0]"
        if self.kind == "append":
            return f"-A {self.chain} {self.spec}"
        if self.kind == "insert":
            return f"-I {self.chain} {self.position} {self.spec}"
        if self.kind == "delete":
            if self.position is not None:
                return f"-D {self.chain} {self.position}"
            return f"-D {self.chain} {self.spec}"
        return f"-X {self.chain}"


class Backend(Protocol):
    """Reads and writes one (family, table) at a time. Blocking: call from a worker thread."""

    name: str

    def read(self, family: Family, table: Table) -> TableState: ...

    def apply(
        self, family: Family, table: Table, ops: list[Op], expected: TableState | None = None
    ) -> None:
        """Apply ``ops`` atomically under the xtables lock. ``expected`` is the state the ops
        were computed from (a backend that can check it under the lock does). Raises
        :class:`ConflictError` when the table changed under us, :class:`BackendError`
        otherwise."""
        ...
