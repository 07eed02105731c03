"""Config files for tests: built as dicts (the TOML's shape), written by one writer.

Every test that needs a config file, for the in-process proxy, a real ``egress proxy``, the
firewall CLI or its controller, writes it with :func:`write_config`, so the files are valid
TOML whatever the values, and a change of format is made once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit

from egress.config import Config, parse_config


def base_config(**sections: Any) -> dict[str, Any]:
    """A minimal config dict with ephemeral listeners; tests add apps and settings."""
    config: dict[str, Any] = {
        "proxy": {
            "socks5_listen": ["127.0.0.1:0"],
            "http_listen": ["127.0.0.1:0"],
            "handshake_timeout": 2.0,
            "connect_timeout": 2.0,
            "idle_timeout": 30.0,
            "drain_timeout": 2.0,
        },
        "log": {"connection_log": "-"},
        "app": [],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (a dict shaped like the TOML, e.g. from :func:`base_config`) to ``path``."""
    path.write_text(tomlkit.dumps(data), encoding="utf-8")
    return path


def make_config(data: dict[str, Any], tmp_path: Path) -> Config:
    """The config ``data`` describes, also written to ``tmp_path/test.toml`` (its source), so
    a reload reads the same settings until a test writes new ones there."""
    path = write_config(tmp_path / "test.toml", data)
    return parse_config(data, source=str(path))


def config_from(data: dict[str, Any]) -> Config:
    """The config ``data`` describes, with no file behind it (for code that never reads one,
    like the firewall plan; also in child processes that have no test directory)."""
    return parse_config(data, source="test.toml")
