"""The python-iptables (libiptc) backend: writes the *legacy* tables in one commit per table.

libiptc takes a snapshot of a whole table (``iptc_init``), edits it in memory and replaces the
table in one ``setsockopt`` (``iptc_commit``). A writer that commits between our snapshot and
our commit would be silently undone, so, like the iptables tools, we hold the xtables lock
(``flock`` on ``/run/xtables.lock``) from the snapshot to the commit, and inside the lock we
check (with a fast ``iptables-legacy-save``) that our part of the table is still what the diff
was computed from; if not, :class:`ConflictError` makes the caller re-read and retry.

python-iptables has no type information, so all of it stays inside this module behind
:class:`IptcBackend`. It acts on the network namespace of the calling *thread*.

Each commit runs in a short-lived worker process (``python -m egress.firewall.backend_iptc``)
that handles one address family: libxtables keeps extensions in process-wide state, and once
an IPv4 target such as ``REDIRECT`` is loaded the IPv6 one can no longer be found in the same
process (python-iptables' maintainers advise one family per process). The worker is a child of
the calling thread, so it inherits that thread's network namespace. Passes with nothing to
change start no worker.

Reading goes through ``iptables-legacy-save``: ~10 ms for 1,000 rules where a libiptc walk
with python-iptables takes ~400 ms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import subprocess
import sys
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


_EXIT_CONFLICT: Final = 3
_EXIT_BACKEND_ERROR: Final = 4
_WORKER_TIMEOUT: Final = 60.0


class IptcBackend:
    """Writes through libiptc (in a per-family worker process); reads through
    ``iptables-legacy-save``."""

    name = "iptc"

    def __init__(self) -> None:
        _import_iptc()

    def read(self, family: Family, table: Table) -> TableState:
        return parse_save(run_save(family, "legacy", table), family, table)

    def apply(
        self, family: Family, table: Table, ops: list[Op], expected: TableState | None = None
    ) -> None:
        if not ops:
            return
        request = {
            "ops": [dataclasses.asdict(op) for op in ops],
            "expected": None if expected is None else _layout_text(expected),
        }
        try:
            result = subprocess.run(
                [sys.executable, "-m", "egress.firewall.backend_iptc", family, table],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=_WORKER_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"backend iptc: the {family} {table} commit did not finish within"
                f" {_WORKER_TIMEOUT:.0f} s"
            ) from None
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        if result.returncode == _EXIT_CONFLICT:
            raise ConflictError(message)
        if result.returncode != 0:
            raise BackendError(message or f"backend iptc worker exited {result.returncode}")


def _layout_text(state: TableState) -> str:
    return json.dumps(state.layout())


def _import_iptc() -> Any:
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
    return iptc


class _Worker:
    """The libiptc side, run inside the worker process for one family."""

    def __init__(self) -> None:
        self._iptc: Any = _import_iptc()

    def apply(self, family: Family, table: Table, ops: list[Op], expected: str | None) -> None:
        iptc = self._iptc
        table_class = iptc.Table if family == "ipv4" else iptc.Table6
        with xtables_lock():
            current = parse_save(run_save(family, "legacy", table), family, table)
            if expected is not None and _layout_text(current) != expected:
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


def _worker_main(argv: list[str]) -> int:
    """``python -m egress.firewall.backend_iptc FAMILY TABLE`` with the ops as JSON on stdin."""
    family, table = argv
    request = json.loads(sys.stdin.read())
    ops = [Op(**op) for op in request["ops"]]
    try:
        _Worker().apply(family, table, ops, request["expected"])  # type: ignore[arg-type]
    except ConflictError as error:
        print(error, file=sys.stderr)
        return _EXIT_CONFLICT
    except BackendError as error:
        print(error, file=sys.stderr)
        return _EXIT_BACKEND_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
