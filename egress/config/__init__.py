"""The TOML config: typed settings (model), reading and checking a file (reader), and the
``check-config`` summary (summary)."""

from egress.config.model import (
    AdminConfig,
    AdminRole,
    AdminToken,
    Concurrency,
    Config,
    FirewallBackend,
    FirewallConfig,
    FirewallMode,
    ListenAddress,
    LogConfig,
    LogLevel,
    ProxyConfig,
    RatelimitBackend,
    RatelimitConfig,
    RedisConfig,
    RedisErrorPolicy,
    ResolverConfig,
    RulesConfig,
    RuleStore,
    SecurityConfig,
)
from egress.config.reader import load_config, parse_config
from egress.config.summary import summarize

# Where every command that takes ``--config`` looks when none is given (an installed node keeps
# its one config here; tests and checkouts pass --config explicitly).
DEFAULT_CONFIG_PATH = "/etc/egress/egress.toml"

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AdminConfig",
    "AdminRole",
    "AdminToken",
    "Concurrency",
    "Config",
    "FirewallBackend",
    "FirewallConfig",
    "FirewallMode",
    "ListenAddress",
    "LogConfig",
    "LogLevel",
    "ProxyConfig",
    "RatelimitBackend",
    "RatelimitConfig",
    "RedisConfig",
    "RedisErrorPolicy",
    "ResolverConfig",
    "RuleStore",
    "RulesConfig",
    "SecurityConfig",
    "load_config",
    "parse_config",
    "summarize",
]
