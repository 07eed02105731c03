"""Reconcile: plan -> read -> diff -> apply -> verify, per (family, table); status; flush.

Each (family, table) is one atomic commit, filter before nat, so the blocking rules are in
place before any redirect (and a failure between the two fails closed: sandbox TCP is rejected
rather than redirected). Repairs are minimal: a chain that exists is edited rule by rule
(a diff of saved lines), keeping the counters of untouched rules; only missing chains are
created and only chains of ours that the plan no longer has are deleted. Rules outside
``EGRESS-*`` chains are never touched, except our one jump per built-in OUTPUT chain.

Racing instances compute the same plan. A commit that finds the table changed under it
(:class:`ConflictError`), or a read-back that does not match, leads to a fresh read and another
attempt; whatever order the commits land in, the last one leaves the plan.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from egress.errors import EgressError
from egress.firewall.backend import Backend, ConflictError, Op, TableState
from egress.firewall.plan import (
    FAMILIES,
    TABLES,
    UNASSIGNED_APP,
    FirewallPlan,
    TablePlan,
    parse_plan_tag,
    parse_tag,
    tag_verifies,
)

__all__ = [
    "SyncError",
    "SyncResult",
    "TableReport",
    "TableResult",
    "app_counters",
    "diff_table",
    "flush",
    "status",
    "sync_once",
]

ATTEMPTS: Final = 3


class SyncError(EgressError):
    """A pass could not bring a table to the plan."""


# --- diff ------------------------------------------------------------------------------------


def _chain_edits(chain: str, have: list[str], want: list[str]) -> list[Op]:
    """Positional deletes and inserts turning ``have`` into ``want`` (lines ``-A CHAIN ...``).

    Opcodes are applied from the end of the chain backwards, so positions computed on the
    original list stay valid for everything before the current edit.
    """
    ops: list[Op] = []
    length = len(have)
    matcher = difflib.SequenceMatcher(None, have, want, autojunk=False)
    prefix = f"-A {chain} "
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag == "equal":
            continue
        for _ in range(i2 - i1):
            ops.append(Op("delete", chain, position=i1 + 1))
            length -= 1
        for offset, line in enumerate(want[j1:j2]):
            position = i1 + 1 + offset
            spec = line.removeprefix(prefix)
            if position == length + 1:
                ops.append(Op("append", chain, spec))
            else:
                ops.append(Op("insert", chain, spec, position))
            length += 1
    return ops


def diff_table(plan: TablePlan, state: TableState) -> list[Op]:
    """The ops that make ``state`` equal to ``plan``: empty when nothing differs.

    Order inside the commit: create/flush chains, edit chains, fix the OUTPUT jump, delete
    chains we no longer want (their references are gone by then).
    """
    declares: list[Op] = []
    edits: list[Op] = []
    for name, rules in plan.chains.items():
        want = [rule.line for rule in rules]
        if name not in state.chains:
            declares.append(Op("declare", name))
            edits.extend(Op("append", name, rule.spec) for rule in rules)
        else:
            edits.extend(_chain_edits(name, state.lines(name), want))
    unwanted = [name for name in state.chains if name not in plan.chains]
    declares.extend(Op("declare", name) for name in unwanted)  # flush before delete
    jump_ops: list[Op] = []
    jumps = state.jumps()
    desired = plan.jump
    if desired is None or jumps != [(1, desired)]:
        jump_ops.extend(Op("delete", "OUTPUT", spec) for _, spec in jumps)
        if desired is not None:
            jump_ops.append(Op("insert", "OUTPUT", desired, 1))
    return [*declares, *edits, *jump_ops, *(Op("delete_chain", name) for name in unwanted)]


def _is_drift(plan: TablePlan, state: TableState) -> bool:
    """Differences are drift (someone changed our rules) rather than a config change when the
    kernel's OUTPUT jump says it holds this very plan, or our tagged jump vanished while our
    chains still have rules."""
    tags = {parse_plan_tag(spec) for _, spec in state.jumps()} - {None}
    if tags:
        return plan.plan_hash in tags
    return any(state.chains.values())


# --- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class TableResult:
    family: str
    table: str
    ops: list[Op] = field(default_factory=list)
    drift_repairs: int = 0
    attempts: int = 0
    rules: int = 0  # rules of ours after the pass

    @property
    def changed(self) -> bool:
        return bool(self.ops)


@dataclass(slots=True)
class SyncResult:
    tables: list[TableResult]
    counters: dict[str, int]  # app -> packets rejected (all families)
    seconds: float

    @property
    def changed(self) -> bool:
        return any(t.changed for t in self.tables)

    @property
    def drift_repairs(self) -> int:
        return sum(t.drift_repairs for t in self.tables)


def app_counters(states: Iterable[TableState], apps: Iterable[str] = ()) -> dict[str, int]:
    """Packets rejected per app, from the counters of the tagged counting rules (every app of
    ``apps`` appears, with 0 when it has no rule yet)."""
    counts = dict.fromkeys(apps, 0)
    for state in states:
        if state.table != "filter":
            continue
        for rules in state.chains.values():
            for rule in rules:
                tag = parse_tag(rule.line)
                if tag is not None and tag[0] is not None:
                    counts[tag[0]] = counts.get(tag[0], 0) + rule.packets
    return counts


# --- passes ----------------------------------------------------------------------------------


def _reconcile(
    backend: Backend, plan: TablePlan, *, attempts: int = ATTEMPTS
) -> tuple[TableResult, TableState]:
    result = TableResult(plan.family, plan.table)
    last_error = ""
    for attempt in range(1, attempts + 1):
        result.attempts = attempt
        state = backend.read(plan.family, plan.table)
        ops = diff_table(plan, state)
        if not ops:
            result.rules = state.rule_count
            return result, state
        if _is_drift(plan, state):
            result.drift_repairs += sum(op.kind in ("append", "insert", "delete") for op in ops)
        result.ops.extend(ops)
        try:
            backend.apply(plan.family, plan.table, ops, state)
        except ConflictError as error:
            last_error = str(error)
            continue
        after = backend.read(plan.family, plan.table)
        if not diff_table(plan, after):
            result.rules = after.rule_count
            return result, after
        last_error = "the read-back differed from the plan (a concurrent writer?)"
    raise SyncError(
        f"{plan.family} {plan.table}: could not reach the plan in {attempts} attempts: {last_error}"
    )


def sync_once(backend: Backend, plan: FirewallPlan) -> SyncResult:
    """One pass over every (family, table); raises :class:`SyncError` or a backend error."""
    started = time.monotonic()
    results: list[TableResult] = []
    states: list[TableState] = []
    for table in TABLES:  # filter (blocking) before nat (redirect), for every family
        for family in FAMILIES:
            result, state = _reconcile(backend, plan.table(family, table))
            results.append(result)
            states.append(state)
    counters = app_counters(states, (*plan.apps, UNASSIGNED_APP))
    return SyncResult(results, counters, time.monotonic() - started)


@dataclass(slots=True)
class TableReport:
    family: str
    table: str
    missing: list[str]  # planned lines absent from the kernel
    unexpected: list[tuple[str, bool]]  # (line, made by us) in our chains but not planned
    jump_ok: bool
    drift: bool  # differs although the kernel holds this plan's tag (see _is_drift)
    rules: int

    @property
    def in_sync(self) -> bool:
        return not self.missing and not self.unexpected and self.jump_ok


def status(backend: Backend, plan: FirewallPlan) -> tuple[list[TableReport], dict[str, int]]:
    """Desired vs actual per (family, table), and the per-app rejected-packet counters."""
    reports: list[TableReport] = []
    states: list[TableState] = []
    for table in TABLES:
        for family in FAMILIES:
            table_plan = plan.table(family, table)
            state = backend.read(family, table)
            states.append(state)
            want = [r.line for rules in table_plan.chains.values() for r in rules]
            have = [rule.line for rules in state.chains.values() for rule in rules]
            have_set, want_set = set(have), set(want)
            desired = table_plan.jump
            jump_ok = state.jumps() == ([(1, desired)] if desired is not None else [])
            reports.append(
                TableReport(
                    family,
                    table,
                    missing=[line for line in want if line not in have_set],
                    unexpected=[
                        (line, tag_verifies(line)) for line in have if line not in want_set
                    ],
                    jump_ok=jump_ok,
                    drift=bool(diff_table(table_plan, state)) and _is_drift(table_plan, state),
                    rules=state.rule_count,
                )
            )
    return reports, app_counters(states, (*plan.apps, UNASSIGNED_APP))


def flush(backend: Backend) -> list[TableResult]:
    """Remove our jumps from OUTPUT and our ``EGRESS-*`` chains; nothing else."""
    empty = FirewallPlan(
        tables=tuple(TablePlan(family, table) for family in FAMILIES for table in TABLES)
    )
    results = []
    for table in reversed(TABLES):  # nat (redirect) first, then filter
        for family in FAMILIES:
            result, _ = _reconcile(backend, empty.table(family, table))
            result.drift_repairs = 0
            results.append(result)
    return results
