"""A store in this process's memory: for tests, and for a proxy that needs nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from rules.apps import RuleSet
from rules.edits import Change
from rules.stores.base import AuditDraft, AuditRecord, StoreState

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Versions, audit and a change feed, all in one process (not shared, not persistent)."""

    def __init__(self, initial: RuleSet | None = None, *, audit_max_records: int = 10_000) -> None:
        rule_set = initial if initial is not None else RuleSet(source="memory")
        self._state = StoreState(rule_set, 0, time.time())
        self._audit: list[AuditRecord] = []
        self._audit_max = audit_max_records
        self._committed = asyncio.Condition()

    @property
    def name(self) -> str:
        return "memory"

    async def read(self, cached: StoreState | None = None) -> StoreState:
        return self._state

    async def write(self, base: StoreState, change: Change, audit: AuditDraft) -> StoreState | None:
        if base.version != self._state.version:
            return None
        version = base.version + 1
        now = time.time()
        self._state = StoreState(
            change.rule_set.with_version(version),
            version if audit.revoke else self._state.revoke_version,
            now,
        )
        self._audit.append(AuditRecord.of(audit, version, now))
        del self._audit[: -self._audit_max]
        async with self._committed:
            self._committed.notify_all()
        return self._state

    async def version(self) -> int:
        return self._state.version

    async def history(self, app: str | None = None, limit: int = 50) -> list[AuditRecord]:
        found = [r for r in reversed(self._audit) if app is None or r.touches(app)]
        return found[:limit]

    async def changes(self) -> AsyncIterator[int]:
        seen = [self._state.version]
        while True:
            async with self._committed:
                await self._committed.wait_for(lambda: self._state.version > seen[0])
            seen[0] = self._state.version
            yield seen[0]

    async def aclose(self) -> None:
        return None
