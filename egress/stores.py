"""Open the rule store a config names: the one place that knows the backends.

``[rules].store = "file"``: the ``[[app]]`` tables of the config file itself (edits rewrite it
atomically, keeping its comments and layout; the audit trail is a JSON-lines file beside it).
``"redis"``: shared by every node, at ``[redis].url`` (one server, Sentinel or Cluster: see
:mod:`egress.redisclient`) under ``[rules].redis_prefix``.
"""

from __future__ import annotations

from pathlib import Path

from egress.config import Config
from egress.config import RuleStore as StoreKind
from rules.stores.base import RuleStore

__all__ = ["audit_log_path", "open_store"]


def audit_log_path(config: Config) -> Path:
    """The file store's audit trail: ``[rules].audit_log``, or ``<config>.audit.jsonl``."""
    if config.rules.audit_log is not None:
        return config.rules.audit_log
    return config.source.with_name(config.source.stem + ".audit.jsonl")


def open_store(config: Config) -> RuleStore:
    """A :class:`RuleStore` over the backend ``config`` names (nothing is read yet)."""
    if config.rules.store is StoreKind.REDIS:
        # redis only when used
        from egress.redisclient import make_client  # noqa: PLC0415
        from rules.stores.redis import TIMEOUT_S, RedisBackend  # noqa: PLC0415

        client = make_client(config.redis.url, timeout=TIMEOUT_S, retries=1)
        backend = RedisBackend(
            client,  # type: ignore[arg-type]  # a RedisCluster has the same commands
            prefix=config.rules.redis_prefix,
            audit_max_records=config.rules.audit_max_records,
            display_url=config.redis.display_url,
        )
        return RuleStore(backend)
    from rules.stores.file import FileBackend  # noqa: PLC0415

    return RuleStore(
        FileBackend(
            config.source,
            audit_path=audit_log_path(config),
            audit_max_records=config.rules.audit_max_records,
            validate=_validate_config_text,
        )
    )


def _validate_config_text(text: str, source: str) -> None:
    """The whole file must still be a valid config after an edit (``ConfigError`` if not)."""
    import tomllib  # noqa: PLC0415

    from egress.config.reader import parse_config  # noqa: PLC0415

    parse_config(tomllib.loads(text), source=source)
