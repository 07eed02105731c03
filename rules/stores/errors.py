"""What can go wrong with a store, beyond an invalid edit (``rules.problems``) or an unknown app
(``rules.edits``)."""

from __future__ import annotations

__all__ = ["StoreConflictError", "StoreError", "StoreUnavailableError"]


class StoreError(Exception):
    """Base of the store's own failures."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or read (Redis down, file unreadable); nothing changed."""


class StoreConflictError(StoreError):
    """Someone else changed what the edit was based on (``If-Match`` / expected version), or
    writers kept colliding; nothing changed. Read again and retry."""

    def __init__(self, message: str, *, current: str | None = None) -> None:
        super().__init__(message)
        self.current = current  # the current ETag or version, when known
