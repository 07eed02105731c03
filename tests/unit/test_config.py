"""Config loading: the example file, every kind of problem, uid lookup and the summary."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egress.config import (
    AdminRole,
    FirewallMode,
    ListenAddress,
    RatelimitBackend,
    load_config,
    parse_config,
    summarize,
)
from egress.config.model import SandboxConfig, SandboxListen
from egress.errors import ConfigError, ConfigProblem
from rules.apps import App, Limits, Mode, RuleSet, UidRange
from rules.parse import parse_rule

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
MINIMAL = '[proxy]\nsocks5_listen = ["127.0.0.1:0"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "egress.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def only_problem(tmp_path: Path, text: str) -> ConfigProblem:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


# --- the example -----------------------------------------------------------------------------


def test_example_loads_as_is() -> None:
    config = load_config(EXAMPLE)
    assert config.source == EXAMPLE
    assert config.proxy.socks5_listen == (ListenAddress("127.0.0.1", 1080),)
    assert config.proxy.http_listen == (ListenAddress("127.0.0.1", 3128),)
    assert config.proxy.unix_socket is None
    assert config.proxy.transparent_listen is None
    assert config.admin.listen == ListenAddress("127.0.0.1", 9090)
    assert config.ratelimit.backend is RatelimitBackend.MEMORY
    assert config.firewall.sandbox_uids == (UidRange(10000, 59999),)
    blog, reports = config.apps
    assert blog.name == "blog"
    assert blog.uids == (UidRange(10001, 10001),)
    assert blog.allow[0].text == "api.example.com:443"
    assert blog.mode is Mode.ENFORCE
    assert blog.limits == Limits(
        connections_per_second=20, burst=40, max_concurrent=100, bandwidth_bytes_per_second=10485760
    )
    assert reports.mode is Mode.REPORT


def test_example_uses_the_defaults_it_documents() -> None:
    config = load_config(EXAMPLE)
    assert config.proxy.handshake_timeout == 5.0
    assert config.proxy.max_handshake_bytes == 8192
    assert config.proxy.unix_socket_mode == 0o660
    assert config.resolver.nameservers == ()
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_config_is_immutable() -> None:
    config = load_config(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.proxy.idle_timeout = 1.0  # type: ignore[misc]
    assert isinstance(config.apps, tuple)
    assert isinstance(config.apps[0].allow, tuple)


def test_parse_config_takes_a_mapping() -> None:
    config = parse_config({"proxy": {"http_listen": ["[::1]:0"]}}, source="inline")
    assert config.source == Path("inline")
    assert config.proxy.http_listen[0].family == socket.AF_INET6
    assert config.apps == ()


# --- each kind of problem names file, key, value and what was expected -------------------------

CASES = [
    # (toml added to MINIMAL, key, shown value, part of expected)
    ('[proxy]\nhttp_listen = ["localhost:3128"]', "proxy.http_listen[0]", "'localhost:3128'", "IP"),
    ('[proxy]\nhttp_listen = ["127.1:3128"]', "proxy.http_listen[0]", "'127.1:3128'", "IP"),
    ('[proxy]\nhttp_listen = ["::1:3128"]', "proxy.http_listen[0]", "'::1:3128'", "HOST:PORT"),
    ('[proxy]\nhttp_listen = ["127.0.0.1:65536"]', "proxy.http_listen[0]", None, "HOST:PORT"),
    ('[proxy]\nhttp_listen = "127.0.0.1:3128"', "proxy.http_listen", None, "a list"),
    ("[proxy]\nidle_timeout = 0", "proxy.idle_timeout", "0", "seconds > 0"),
    ("[proxy]\nidle_timeout = true", "proxy.idle_timeout", "True", "seconds > 0"),
    ('[proxy]\nidle_timeout = "30s"', "proxy.idle_timeout", "'30s'", "seconds > 0"),
    ("[proxy]\nidle_timeout = inf", "proxy.idle_timeout", "inf", "seconds > 0"),
    ("[proxy]\nmax_handshake_bytes = 100", "proxy.max_handshake_bytes", "100", "512 to 65536"),
    ("[proxy]\nmax_connections = 1.5", "proxy.max_connections", "1.5", "integer"),
    ('[proxy]\nunix_socket = "rel/sock"', "proxy.unix_socket", "'rel/sock'", "absolute path"),
    ('[proxy]\nunix_socket_mode = "rw"', "proxy.unix_socket_mode", "'rw'", "octal"),
    ('[resolver]\nnameservers = ["dns.google"]', "resolver.nameservers[0]", None, "IP address"),
    ("[resolver]\nattempts = 0", "resolver.attempts", "0", "integer"),
    ("[resolver]\nmin_ttl = 600.0", "resolver.min_ttl", "600.0", "at most max_ttl"),
    ('[security]\nallow_special = ["10.8.0.1/16"]', "security.allow_special[0]", None, "network"),
    ('[rules]\nstore = "disk"', "rules.store", "'disk'", '"file", "redis"'),
    ('[rules]\nredis_prefix = "a b"', "rules.redis_prefix", "'a b'", "1 to 64 characters"),
    (
        '[rules]\nstore = "redis"\n[[app]]\nname = "a"\nuids = [10001]',
        "[[app]]",
        "'1 app tables'",
        "no [[app]] tables",
    ),
    ('[ratelimit]\nbackend = "disk"', "ratelimit.backend", "'disk'", '"memory", "redis"'),
    ('[ratelimit]\non_redis_error = "panic"', "ratelimit.on_redis_error", None, '"local"'),
    ('[redis]\nurl = "localhost:6379"', "redis.url", "'localhost:6379'", "redis://"),
    ('[admin]\nlisten = "127.0.0.1"', "admin.listen", "'127.0.0.1'", "HOST:PORT"),
    (
        '[admin]\ntokens = [{ name = "ops", sha256 = "' + "a" * 64 + '", role = "root" }]',
        "admin.tokens[0].role",
        "'root'",
        '"read", "write"',
    ),
    ('[firewall]\nbackend = "nft"', "firewall.backend", "'nft'", '"iptc"'),
    ('[firewall]\nsandbox_uids = ["0-99"]', "firewall.sandbox_uids[0]", "'0-99'", "other than 0"),
    ("[firewall]\ninterval = -1", "firewall.interval", "-1", "seconds > 0"),
    ('[firewall]\nmetrics_listen = "localhost:9091"', "firewall.metrics_listen", None, "IP"),
    ('[firewall]\nmode = "transparent"', "firewall.mode", "'transparent'", "transparent_listen"),
    ('[log]\nlevel = "verbose"', "log.level", "'verbose'", '"debug"'),
    ('[log]\nconnection_log = ""', "log.connection_log", "''", "non-empty"),
    ('[[app]]\nname = "Blog"\nuids = [10001]', "app[0].name", "'Blog'", "a-z"),
    ("[[app]]\nuids = [10001]", "app[0].name", "nothing", "app name"),
    ('[[app]]\nname = "a"', "app[0].uids", "nothing", "non-empty list"),
    ('[[app]]\nname = "a"\nuids = []', "app[0].uids", "[]", "non-empty list"),
    ('[[app]]\nname = "a"\nuids = ["20-10"]', "app[0].uids[0]", "'20-10'", "range"),
    ('[[app]]\nname = "a"\nuids = [4294967296]', "app[0].uids[0]", None, "uid"),
    ('[[app]]\nname = "a"\nuids = ["1 - 5"]', "app[0].uids[0]", None, "uid"),
    ('[[app]]\nname = "a"\nuids = [0]', "app[0].uids[0]", "0", "other than 0"),
    ('[[app]]\nname = "a"\nuids = [10001]\nmode = "audit"', "app[0].mode", None, '"report"'),
    (
        '[[app]]\nname = "a"\nuids = [10001]\nlimits = { burst = 0 }',
        "app[0].limits.burst",
        "0",
        "integer from 1 to 1000000",
    ),
    (
        '[[app]]\nname = "a"\nuids = [10001]\nproxy_auth = { username = "a" }',
        "app[0].proxy_auth.password_sha256",
        "nothing",
        "SHA-256",
    ),
    ('[app]\nname = "a"', "app", None, "[[app]]"),
]


@pytest.mark.parametrize(("extra", "key", "value", "expected"), CASES)
def test_each_problem_names_key_value_and_expectation(
    tmp_path: Path, extra: str, key: str, value: str | None, expected: str
) -> None:
    if extra.startswith("[proxy]"):  # one [proxy] table: add the listener to it
        text = extra + '\nsocks5_listen = ["127.0.0.1:0"]\n'
    else:
        text = MINIMAL + extra
    problem = only_problem(tmp_path, text)
    assert problem.file == str(tmp_path / "egress.toml")
    assert problem.key == key
    if value is not None:
        assert problem.value == value
    assert expected in problem.expected
    rendered = str(problem)
    assert rendered.startswith(f"{problem.file}: {key}: got {problem.value}; expected ")


def test_bad_rule_reports_the_rule_parser_message(tmp_path: Path) -> None:
    text = MINIMAL + '[[app]]\nname = "a"\nuids = [10001]\nallow = ["ok.example.com:443", "x"]'
    problem = only_problem(tmp_path, text)
    assert problem.key == "app[0].allow[1]"
    assert problem.value == "'x'"
    with pytest.raises(ValueError, match=r".") as caught:
        parse_rule("x")
    assert problem.expected == str(caught.value)


def test_no_listener_is_a_problem_on_proxy(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[log]\nlevel = "info"\n')
    assert problem.key == "proxy"
    assert "socks5_listen" in problem.expected


def test_a_bad_listener_is_not_also_reported_as_missing(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[proxy]\nsocks5_listen = ["localhost:1080"]\n')
    assert problem.key == "proxy.socks5_listen[0]"


def test_same_address_on_two_listeners(tmp_path: Path) -> None:
    text = '[proxy]\nsocks5_listen = ["127.0.0.1:1080"]\nhttp_listen = ["127.0.0.1:1080"]\n'
    problem = only_problem(tmp_path, text)
    assert problem.key == "proxy.http_listen[0]"
    assert problem.hint is not None
    assert "proxy.socks5_listen[0]" in problem.hint


# --- unknown keys ----------------------------------------------------------------------------


def test_unknown_key_suggests_the_nearest_valid_one(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[proxy]\nsocks_listen = ["127.0.0.1:1080"]\n')
    assert problem.key == "proxy.socks_listen"
    assert problem.hint == "did you mean 'socks5_listen'?"
    assert "did you mean 'socks5_listen'?" in str(problem)


@pytest.mark.parametrize(
    ("extra", "key", "suggestion"),
    [
        ("[resolvr]\ntimeout = 1.0", "resolvr", "resolver"),
        ('[[app]]\nname = "a"\nuid = [10001]', "app[0].uid", "uids"),
        (
            '[[app]]\nname = "a"\nuids = [1]\nlimits = { max_concurent = 1 }',
            "app[0].limits.max_concurent",
            "max_concurrent",
        ),
        ('[admin]\ntokens = [{ name = "a", sha265 = "x" }]', "admin.tokens[0].sha265", "sha256"),
    ],
)
def test_unknown_keys_at_every_level(tmp_path: Path, extra: str, key: str, suggestion: str) -> None:
    problems = problems_of(tmp_path, MINIMAL + extra)
    unknown = [p for p in problems if p.key == key]
    assert len(unknown) == 1, "\n".join(map(str, problems))
    assert unknown[0].hint == f"did you mean {suggestion!r}?"


def test_unknown_key_without_a_close_match_lists_known_keys(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, MINIMAL + "[redis]\nzzz = 1\n")
    assert problem.hint == "known keys: url"


# --- several at once, formatting, secrets ----------------------------------------------------


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = """
[proxy]
socks5_listen = ["localhost:1080"]
idle_timeout = "forever"
[resolver]
attempts = 0
[[app]]
name = "blog"
uids = [10001]
allow = ["api.example.com", "*.example.org:80,443", "203.0.113.0/24:99999"]
[[app]]
name = "blog"
uids = ["10001-10005"]
"""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    keys = [p.key for p in caught.value.problems]
    assert keys[:4] == [
        "proxy.socks5_listen[0]",
        "proxy.idle_timeout",
        "resolver.attempts",
        "app[0].allow[0]",
    ]
    assert "app[0].allow[2]" in keys
    assert "app[1].name" in keys  # duplicate name
    lines = str(caught.value).splitlines()
    assert len(lines) == len(caught.value.problems)
    assert all(line.startswith(str(tmp_path / "egress.toml") + ": ") for line in lines)


def test_long_values_are_truncated(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, MINIMAL + f'[log]\nlevel = "{"x" * 500}"\n')
    assert len(problem.value) == 80
    assert problem.value.endswith("...")


def test_secrets_stay_out_of_problems(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '[redis]\nurl = "http://user:hunter2@db:6379"\n'
        + '[admin]\ntokens = [{ name = "ops", sha256 = "my-raw-bearer-token" }]\n'
    )
    rendered = str(problems_and_error(tmp_path, text))
    assert "hunter2" not in rendered
    assert "my-raw-bearer-token" not in rendered
    assert "redis.url" in rendered
    assert "admin.tokens[0].sha256" in rendered


def problems_and_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value


def test_config_error_str_format() -> None:
    error = ConfigError(
        [
            ConfigProblem("f.toml", "a.b", "1", "a string", "did you mean 'c'?"),
            ConfigProblem("f.toml", "x[0]", "'y'", "z"),
        ]
    )
    assert str(error) == (
        "f.toml: a.b: got 1; expected a string (did you mean 'c'?)\n"
        "f.toml: x[0]: got 'y'; expected z"
    )


# --- uids ------------------------------------------------------------------------------------


def test_uid_overlap_names_both_apps(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '[[app]]\nname = "blog"\nuids = ["10001-10009"]\n'
        + '[[app]]\nname = "shop"\nuids = [10020, 10005]\n'
    )
    problem = only_problem(tmp_path, text)
    assert problem.key == "app[1].uids[1]"
    assert problem.value == "'10005'"
    assert problem.hint is not None
    assert "'shop'" in problem.hint
    assert "'blog'" in problem.hint
    assert "app[0].uids[0]" in problem.hint


def test_uid_overlap_within_one_app(tmp_path: Path) -> None:
    text = MINIMAL + '[[app]]\nname = "blog"\nuids = ["10001-10009", "10009"]\n'
    problem = only_problem(tmp_path, text)
    assert problem.key == "app[0].uids[1]"


def test_app_for_uid_single_uids_and_ranges(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '[[app]]\nname = "a"\nuids = [10001, "10003"]\n'
        + '[[app]]\nname = "b"\nuids = ["10010-10019", "20000-29999"]\n'
        + '[[app]]\nname = "c"\nuids = ["10002"]\n'
    )
    config = load_config(write(tmp_path, text))

    def name(uid: int) -> str | None:
        app = config.ruleset.app_for_uid(uid)
        return None if app is None else app.name

    assert [name(u) for u in (10001, 10002, 10003, 10004)] == ["a", "c", "a", None]
    assert [name(u) for u in (10009, 10010, 10015, 10019, 10020)] == [None, "b", "b", "b", None]
    assert [name(u) for u in (19999, 20000, 29999, 30000)] == [None, "b", "b", None]
    assert name(0) is None
    assert name(2**32 - 1) is None


@given(
    st.lists(
        st.tuples(st.integers(1, 10_000), st.integers(0, 30)), min_size=0, max_size=30, unique=True
    ),
    st.lists(st.integers(0, 11_000), max_size=50),
)
def test_app_for_uid_agrees_with_a_linear_scan(
    spans: list[tuple[int, int]], probes: list[int]
) -> None:
    ranges: list[UidRange] = []
    for first, width in sorted(spans):
        candidate = UidRange(first, first + width)
        if all(candidate.last < r.first or candidate.first > r.last for r in ranges):
            ranges.append(candidate)
    apps = tuple(App(name=f"a{i}", uids=(r,)) for i, r in enumerate(ranges))
    ruleset = RuleSet(apps)
    for uid in probes:
        expected = next((app for app in apps if app.uids[0].contains(uid)), None)
        assert ruleset.app_for_uid(uid) is expected


def test_uid_range_parse_and_str() -> None:
    assert UidRange.parse(7) == UidRange(7, 7)
    assert UidRange.parse("7") == UidRange(7, 7)
    assert str(UidRange.parse("10-20")) == "10-20"
    assert UidRange(5, 9).contains(9)
    assert not UidRange(5, 9).contains(10)
    for bad in (True, -1, "a", "-5", "5-", "+5", "1_000", 1.0, "4294967296"):
        with pytest.raises(ValueError, match=r"."):
            UidRange.parse(bad)


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "family"),
    [
        ("127.0.0.1:1080", "127.0.0.1:1080", socket.AF_INET),
        ("[::1]:1080", "[::1]:1080", socket.AF_INET6),
        ("[0:0::1]:0", "[::1]:0", socket.AF_INET6),
        ("0.0.0.0:3128", "0.0.0.0:3128", socket.AF_INET),
    ],
)
def test_listen_address(text: str, canonical: str, family: socket.AddressFamily) -> None:
    address = ListenAddress.parse(text)
    assert str(address) == canonical
    assert address.family == family


@pytest.mark.parametrize(
    "text",
    [
        "localhost:80",
        "127.1:80",
        "0x7f.0.0.1:80",
        "010.0.0.1:80",
        "1.2.3.4",
        "[1.2.3.4]:80",
        "[::1]",
        "::1:80",
        "1.2.3.4:-1",
        "1.2.3.4:http",
        "1.2.3.4:٨٠",
    ],
)
def test_listen_address_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        ListenAddress.parse(text)


def test_nameservers_default_to_port_53(tmp_path: Path) -> None:
    text = MINIMAL + '[resolver]\nnameservers = ["192.0.2.53", "127.0.0.1:5353", "::1", "[::1]"]'
    config = load_config(write(tmp_path, text))
    assert [str(ns) for ns in config.resolver.nameservers] == [
        "192.0.2.53:53",
        "127.0.0.1:5353",
        "[::1]:53",
        "[::1]:53",
    ]


# --- TOML syntax and files -------------------------------------------------------------------


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    text = '[proxy]\nsocks5_listen = ["127.0.0.1:1080"]\nhttp_listen = [127.0.0.1:3128]\n'
    problem = only_problem(tmp_path, text)
    assert problem.key.startswith("line 3, column ")
    assert problem.value == repr("http_listen = [127.0.0.1:3128]")
    assert problem.expected == "valid TOML"
    assert problem.hint


def test_toml_error_at_end_of_document(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "[proxy]\nsocks5_listen = [")
    assert problem.key == "end of document"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    (problem,) = caught.value.problems
    assert problem.file == str(tmp_path / "nope.toml")
    assert "no such file" in problem.value


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "egress.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].key == "line 3"


# --- full settings and the summary -----------------------------------------------------------

TOKEN_HASH = hashlib.sha256(b"ops-token").hexdigest()
PASSWORD_HASH = hashlib.sha256(b"app-password").hexdigest()

FULL = f"""
[proxy]
socks5_listen = ["127.0.0.1:1080", "[::1]:1080"]
http_listen = ["127.0.0.1:3128"]
unix_socket = "/run/egress/socks.sock"
unix_socket_mode = "0666"
unix_socket_owner = "egress"
unix_socket_group = 1500
transparent_listen = "127.0.0.1:15001"
handshake_timeout = 2.5
max_connections = 500

[resolver]
nameservers = ["127.0.0.1:5353"]
min_ttl = 1
max_ttl = 60

[security]
allow_special = ["10.8.0.0/16"]

[ratelimit]
backend = "redis"
on_redis_error = "deny"

[redis]
url = "redis://:s3cret@127.0.0.1:6379/1"

[admin]
listen = "127.0.0.1:9090"
tokens = [{{ name = "ops", sha256 = "{TOKEN_HASH.upper()}", role = "write" }},
          {{ name = "grafana", sha256 = "{"b" * 64}" }}]

[firewall]
sandbox_uids = ["10000-19999", 30000]
mode = "transparent"
backend = "iptables-restore"
interval = 2
metrics_listen = "127.0.0.1:9091"

[[app]]
name = "blog"
uids = ["10001-10009"]
allow = ["API.Example.com:443", "*.example.org:443,80"]
limits = {{ connections_per_second = 2.5, max_concurrent = 10 }}
proxy_auth = {{ username = "blog", password_sha256 = "{PASSWORD_HASH}" }}
"""


def test_full_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    proxy = config.proxy
    assert proxy.unix_socket == Path("/run/egress/socks.sock")
    assert proxy.unix_socket_mode == 0o666
    assert (proxy.unix_socket_owner, proxy.unix_socket_group) == ("egress", 1500)
    assert proxy.transparent_listen == ListenAddress("127.0.0.1", 15001)
    assert proxy.handshake_timeout == 2.5
    assert isinstance(config.resolver.min_ttl, float)
    assert config.security.allow_special == ("10.8.0.0/16",)
    assert [str(n) for n in config.security.special_exceptions.networks] == ["10.8.0.0/16"]
    assert config.firewall.mode is FirewallMode.TRANSPARENT
    assert config.firewall.sandbox_uids == (UidRange(10000, 19999), UidRange(30000, 30000))
    assert config.firewall.metrics_listen == ListenAddress("127.0.0.1", 9091)
    ops, grafana = config.admin.tokens
    assert ops.sha256 == TOKEN_HASH
    assert ops.role is AdminRole.WRITE
    assert grafana.role is AdminRole.READ
    (blog,) = config.apps
    assert blog.limits is not None
    assert blog.limits.connections_per_second == 2.5
    assert blog.limits.burst is None
    assert blog.proxy_auth is not None
    assert blog.proxy_auth.password_sha256 == PASSWORD_HASH
    assert PASSWORD_HASH not in repr(config)
    assert TOKEN_HASH not in repr(config)
    assert "s3cret" not in repr(config)


def test_summary_shows_canonical_rules_and_no_secrets(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    text = summarize(config)
    assert "allow api.example.com:443" in text
    assert "allow *.example.org:80,443" in text
    assert "[::1]:1080" in text
    assert "/run/egress/socks.sock (mode 0666" in text
    assert "ops (write)" in text
    assert "grafana (read)" in text
    assert "10.8.0.0/16" in text
    assert "blog: uids 10001-10009; mode enforce" in text
    assert "proxy auth: user 'blog'" in text
    assert "transparent mode" in text
    for secret in (TOKEN_HASH, TOKEN_HASH.upper(), "b" * 64, PASSWORD_HASH, "s3cret"):
        assert secret not in text


def test_summary_of_the_example() -> None:
    text = summarize(load_config(EXAMPLE))
    assert "socks5       127.0.0.1:1080" in text
    assert "reports: uids 10010, 10011-10019; mode report" in text
    assert "allow *.reports.example.net:443" in text


def test_a_proxy_running_as_a_sandbox_uid_refuses_to_start() -> None:
    from egress.errors import EgressError
    from egress.runtime import check_proxy_uid

    config = parse_config(
        {
            "proxy": {"socks5_listen": ["127.0.0.1:1080"]},
            "firewall": {"sandbox_uids": ["10000-10999"]},
        },
        source="/etc/egress.toml",
    )
    check_proxy_uid(config, 0)
    check_proxy_uid(config, 20000)
    with pytest.raises(EgressError, match=r"firewall.sandbox_uids: the proxy runs as uid 10500"):
        check_proxy_uid(config, 10500)


def test_check_config_warns_about_what_the_store_ignores(tmp_path: Path) -> None:
    from egress.config.lint import warnings_for

    listen = '[proxy]\nsocks5_listen = ["127.0.0.1:0"]\n'
    redis = load_config(write(tmp_path, listen + '[rules]\nstore = "redis"\nversion = 4\n'))
    assert any(w.startswith("rules.version: ignored") for w in warnings_for(redis))
    token = f'[admin]\ntokens = [{{ name = "ops", sha256 = "{"a" * 64}" }}]\n'
    assert any(
        "no admin.listen" in w for w in warnings_for(load_config(write(tmp_path, listen + token)))
    )
    plain = load_config(write(tmp_path, listen + '[rules]\nstore = "file"\nversion = 4\n'))
    assert warnings_for(plain) == []


# --- [ratelimit] -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[ratelimit]\nlocal_share = 1.5\n", "ratelimit.local_share", "at most 1"),
        ("[ratelimit]\nlocal_share = 0\n", "ratelimit.local_share", "greater than 0"),
        ("[ratelimit]\nredis_timeout = 10\n", "ratelimit.redis_timeout", "0.001 to 5"),
        ("[ratelimit]\nbreaker_failures = 0\n", "ratelimit.breaker_failures", "1 to 1000"),
        ("[ratelimit]\nbreaker_open = 60\n", "ratelimit.breaker_open", "0.01 to 8"),
        ("[ratelimit]\ntunnel_ttl = 0.5\n", "ratelimit.tunnel_ttl", "1 to 300"),
        ("[ratelimit]\nredis_prefix = 'a{b}'\n", "ratelimit.redis_prefix", "characters"),
        ('[ratelimit]\nconcurrency = "global"\n', "ratelimit.concurrency", 'backend = "redis"'),
        ("[ratelimit.defaults]\nburst = 0\n", "ratelimit.defaults.burst", "1 to 1000000"),
        (
            "[ratelimit.defaults]\nconnections_per_second = 1e-320\n",
            "ratelimit.defaults.connections_per_second",
            "0.001 to 1000000",
        ),
        ("[ratelimit.defaults]\nbrust = 5\n", "ratelimit.defaults", "brust"),
    ],
)
def test_ratelimit_mistakes_name_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    problem = only_problem(tmp_path, '[proxy]\nsocks5_listen = ["127.0.0.1:1080"]\n' + text)
    shown = str(problem)
    assert key in shown and expected in shown, shown
    assert "egress.toml" in shown


def test_ratelimit_settings_are_read() -> None:
    config = parse_config(
        {
            "proxy": {"socks5_listen": ["127.0.0.1:1080"]},
            "ratelimit": {
                "backend": "redis",
                "on_redis_error": "deny",
                "local_share": 0.25,
                "redis_timeout": 0.02,
                "concurrency": "global",
                "tunnel_ttl": 5,
                "defaults": {"connections_per_second": 50, "max_concurrent": 10},
            },
        },
        source="test",
    )
    rl = config.ratelimit
    assert (rl.local_share, rl.redis_timeout, rl.tunnel_ttl) == (0.25, 0.02, 5.0)
    assert rl.defaults == Limits(connections_per_second=50, max_concurrent=10)
    assert "deny" in summarize(config) and "all nodes" in summarize(config)


def test_a_burst_is_idle_only_when_no_rate_applies_not_even_a_default() -> None:
    from egress.config.lint import warnings_for

    app = {"name": "blog", "uids": ["10001"], "allow": ["a.example.com:443"]}
    base = {"proxy": {"socks5_listen": ["127.0.0.1:1080"]}}
    with_defaults = parse_config(
        {
            **base,
            "ratelimit": {"defaults": {"connections_per_second": 5}},
            "app": [{**app, "limits": {"burst": 50, "destination_burst": 3}}],
        },
        source="test",
    )
    assert [w.split(": ", 1)[1] for w in warnings_for(with_defaults)] == [
        "has no effect without destination_connections_per_second"
    ]
    alone = parse_config({**base, "app": [{**app, "limits": {"burst": 50}}]}, source="test")
    assert any("limits.burst: has no effect" in w for w in warnings_for(alone))


def test_the_summary_shows_the_limits_in_force_with_the_defaults() -> None:
    config = parse_config(
        {
            "proxy": {"socks5_listen": ["127.0.0.1:1080"]},
            "ratelimit": {"defaults": {"connections_per_second": 50, "max_concurrent": 10}},
            "app": [
                {"name": "blog", "uids": ["10001"], "limits": {"max_concurrent": 3}},
                {"name": "shop", "uids": ["10002"]},
            ],
        },
        source="test",
    )
    lines = summarize(config).splitlines()
    blog, shop = (
        lines.index(f"  {name}: uids {uid}; mode enforce")
        for name, uid in (("blog", 10001), ("shop", 10002))
    )
    assert (
        lines[blog + 2] == "    limits: 50 connections/s, 3 concurrent (with [ratelimit.defaults])"
    )
    assert (
        lines[shop + 2] == "    limits: 50 connections/s, 10 concurrent (with [ratelimit.defaults])"
    )


# --- [sandbox] ---------------------------------------------------------------------------------
def test_sandbox_defaults_and_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.sandbox == SandboxConfig(proxy=None, listen=SandboxListen.ANY)
    text = MINIMAL + '[sandbox]\nproxy = "[::1]:1081"\nlisten = "none"\n'
    config = load_config(write(tmp_path, text))
    assert config.sandbox == SandboxConfig(ListenAddress("::1", 1081), SandboxListen.NONE)
    assert "sandbox: shim to [::1]:1081; bind/listen none" in summarize(config).splitlines()


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('listen = "outbound"', "sandbox.listen", "any"),
        ('proxy = "192.0.2.1:1080"', "sandbox.proxy", "loopback"),
        ('proxy = "localhost:1080"', "sandbox.proxy", "IP address"),
        ("proxi = 1", "sandbox.proxi", "unknown"),
    ],
)
def test_sandbox_mistakes_name_the_key(tmp_path: Path, line: str, key: str, says: str) -> None:
    problem = only_problem(tmp_path, MINIMAL + f"[sandbox]\n{line}\n")
    assert key in str(problem) and says in str(problem)
