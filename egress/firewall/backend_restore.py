"""The ``iptables-restore --noflush`` backend: one atomic transaction per table.

``*-restore --noflush -w`` commits a whole table at once (legacy: one libiptc commit; nft: one
netlink batch) while holding the xtables lock, and leaves everything it is not told about
alone. Declaring an existing user chain (``:CHAIN - [0:0]``) under ``--noflush`` flushes just
that chain, which is how a chain is rewritten. Works with either variant; ``variant`` picks the
binaries, so the rules land where the host's ``iptables`` command shows them.
"""

from __future__ import annotations

import subprocess
from typing import Final, Literal

from egress.firewall.backend import BackendError, ConflictError, Op, TableState, parse_save
from egress.firewall.plan import Family, Table

__all__ = ["RestoreBackend", "Variant", "tool_name"]

Variant = Literal["legacy", "nft"]
_TIMEOUT: Final = 30.0  # seconds; -w waits for the lock up to 10 s (see below) plus the commit
_LOCK_WAIT: Final = "10"

# Messages iptables-restore prints when a rule or chain it was told to delete is not there, or a
# chain it was told to create/delete is in the wrong state: the table changed under us.
_CONFLICT_HINTS: Final = (
    "does a matching rule exist",
    "Bad rule",
    "No chain/target/match by that name",
    "Index of deletion too big",
    "Index of insertion too big",
    "Chain already exists",
    "Directory not empty",
    "Too many links",
    "Device or resource busy",
)


def tool_name(family: Family, variant: Variant, tool: Literal["save", "restore"]) -> str:
    base = "iptables" if family == "ipv4" else "ip6tables"
    return f"{base}-{variant}-{tool}"


class RestoreBackend:
    """Reads with ``*-save -c -t TABLE``, writes with ``*-restore --noflush -w``."""

    def __init__(self, variant: Variant) -> None:
        self.variant: Variant = variant
        self.name = f"iptables-restore ({variant})"

    def read(self, family: Family, table: Table) -> TableState:
        return parse_save(run_save(family, self.variant, table), family, table)

    def apply(
        self, family: Family, table: Table, ops: list[Op], expected: TableState | None = None
    ) -> None:
        """One ``--noflush`` transaction. ``expected`` cannot be checked inside restore's own
        lock; a positional edit that raced with another writer is caught by the caller's
        read-back verification and repaired by its retry. A transaction that fails while the
        table no longer looks like ``expected`` lost a race (the legacy tools only say "line N
        failed"), so it is a :class:`ConflictError` and the caller retries."""
        if not ops:
            return
        text = "\n".join([f"*{table}", *(op.restore_line() for op in ops), "COMMIT", ""])
        command = [tool_name(family, self.variant, "restore"), "--noflush", "-w", _LOCK_WAIT]
        result = _run(command, text)
        if result.returncode != 0:
            message = result.stderr.strip() or result.stdout.strip()
            error = f"{command[0]} failed on the {family} {table} table: {message}"
            if any(hint in message for hint in _CONFLICT_HINTS):
                raise ConflictError(error)
            if expected is not None and self.read(family, table).layout() != expected.layout():
                raise ConflictError(f"{error} (the table changed under us)")
            raise BackendError(error)


def run_save(family: Family, variant: Variant, table: Table) -> str:
    """``*-save -c -t TABLE`` of the variant; raises :class:`BackendError` on failure."""
    command = [tool_name(family, variant, "save"), "-c", "-t", table]
    result = _run(command, None)
    if result.returncode != 0:
        raise BackendError(
            f"{command[0]} failed: {result.stderr.strip()} (is the {table} table's kernel"
            " module available, and are we root?)"
        )
    return result.stdout


def _run(command: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise BackendError(
            f"{command[0]} not found: install the iptables package (it ships both variants)"
        ) from None
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"{command[0]} did not finish within {_TIMEOUT:.0f} s (xtables lock held elsewhere?)"
        ) from None
