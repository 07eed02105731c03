"""The python-iptables (libiptc) backend: writes the *legacy* tables in one commit per table.

libiptc takes a snapshot of a whole table (``iptc_init``), edits it in memory and replaces the
table in one ``setsockopt`` (``iptc_commit``). A writer that commits between our snapshot and
our commit would be silently undone, so, like the iptables tools, we hold the xtables lock
(``flock`` on ``/run/xtables.lock``) from the snapshot to the commit, and inside the lock we
check (with a fast ``iptables-legacy-save``) that our part of the table is still what the diff
was computed from; if not, :class:`ConflictError` makes the caller re-read and retry.

python-iptables has no type information, so all of it stays inside this module behind
:class:`IptcBackend`. It acts on the network namespace of the calling *thread*.

Reading goes through ``iptables-legacy-save``: ~10 ms for 1,000 rules where a libiptc walk
with python-iptables takes ~400 ms.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import time
import warnings
from collections.abc import Iterator
from typing import Any, Final

from egress.firewall.backend import BackendError, ConflictError, Op, TableState, parse_save
from egress.firewall.backend_restore import run_save
from egress.firewall.plan import CHAIN_PREFIX, Family, Table

__all__ = ["IptcBackend", "xtables_lock"]

XTABLES_LOCK: Final = "/run/xtables.lock"
_LOCK_TIMEOUT: Final = 10.0  # seconds, as `iptables -w 10`


@contextlib.contextmanager
def xtables_lock(timeout: float = _LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock the iptables tools take (``$XTABLES_LOCKFILE``, default /run/xtables.lock)."""
    path = os.environ.get("XTABLES_LOCKFILE", XTABLES_LOCK)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"the xtables lock {path} is still held after {timeout:.0f} s by another"
                        " program (an iptables command stuck?)"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the flock


class IptcBackend:
    """Writes through libiptc; reads through ``iptables-legacy-save``."""

    name = "iptc"

    def __init__(self) -> None:
        try:
            # python-iptables 1.x has regex strings with invalid escapes: compiling it warns.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", SyntaxWarning)
                import iptc  # noqa: PLC0415 - optional dependency, loaded only when chosen
        except Exception as error:  # python-iptables raises plain Exceptions when libs are missing
            raise BackendError(
                f"backend iptc: python-iptables is not usable ({error}); install the 'firewall'"
                ' extra, or use backend = "iptables-restore"'
            ) from None
        self._iptc: Any = iptc

    def read(self, family: Family, table: Table) -> TableState:
        return parse_save(run_save(family, "legacy", table), family, table)

    def apply(
        self, family: Family, table: Table, ops: list[Op], expected: TableState | None = None
    ) -> None:
        if not ops:
            return
        iptc = self._iptc
        table_class = iptc.Table if family == "ipv4" else iptc.Table6
        with xtables_lock():
            if expected is not None and not _same(self.read(family, table), expected):
                raise ConflictError(f"the {family} {table} table changed while we planned")
            handle = table_class(table, autocommit=False)
            try:
                handle.refresh()  # a fresh snapshot, taken under the lock
                for op in ops:
                    self._apply_op(handle, family, op)
                handle.commit()
            except iptc.IPTCError as error:
                raise ConflictError(f"libiptc: {family} {table}: {error}") from None
            finally:
                handle.refresh()  # drop our edited snapshot (autocommit is off: no commit)

    def _apply_op(self, handle: Any, family: Family, op: Op) -> None:
        iptc = self._iptc
        chain = iptc.Chain(handle, op.chain)
        if op.kind == "declare":
            if handle.is_chain(op.chain):
                handle.flush_entries(op.chain)
            else:
                handle.create_chain(op.chain)
        elif op.kind == "delete_chain":
            handle.delete_chain(op.chain)
        elif op.kind == "append":
            chain.append_rule(self._rule(family, op.spec))
        elif op.kind == "insert":
            chain.insert_rule(self._rule(family, op.spec), (op.position or 1) - 1)
        elif op.position is not None:  # delete by position
            ok = handle._iptc.iptc_delete_num_entry(
                op.chain.encode(), op.position - 1, handle._handle
            )
            if ok != 1:
                raise iptc.IPTCError(f"can't delete rule {op.position} of {op.chain}")
        else:
            chain.delete_rule(self._rule(family, op.spec))

    def _rule(self, family: Family, spec: str) -> Any:
        """An iptc.Rule from a rule spec in our canonical save syntax (the subset we emit)."""
        iptc = self._iptc
        rule = iptc.Rule() if family == "ipv4" else iptc.Rule6()
        words = shlex.split(spec)
        current: Any = None
        index = 0
        while index < len(words):
            option = words[index]
            value = words[index + 1] if index + 1 < len(words) else ""
            index += 2
            if option == "-d":
                rule.dst = value
            elif option == "-s":
                rule.src = value
            elif option == "-o":
                rule.out_interface = value
            elif option == "-p":
                rule.protocol = value
            elif option == "-m":
                current = rule.create_match(value)
            elif option in ("-j", "-g"):
                if value.startswith(CHAIN_PREFIX) or value in ("ACCEPT", "DROP", "RETURN"):
                    rule.target = iptc.Target(rule, value)
                    current = None
                else:
                    current = rule.create_target(value)
            elif option.startswith("--") and current is not None:
                setattr(current, option[2:].replace("-", "_"), value)
            else:
                raise BackendError(f"backend iptc cannot express {option!r} in rule {spec!r}")
        return rule


def _same(a: TableState, b: TableState) -> bool:
    """Our chains and our OUTPUT jumps are the same in both (counters ignored)."""
    return {name: a.lines(name) for name in a.chains} == {
        name: b.lines(name) for name in b.chains
    } and a.jumps() == b.jumps()
