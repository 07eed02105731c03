"""``[redis].url``: every accepted form, every refusal with what is wrong and the form expected,
and never the password in a message, a log line or a ``repr``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egress.config import load_config, parse_config
from egress.errors import ConfigError
from egress.redisclient import make_client
from egress.redisurl import (
    RedisKind,
    RedisNode,
    RedisTarget,
    RedisUrlError,
    parse_redis_url,
    redact_redis_url,
)

SECRET = "s3cr3t-Pw"
MINIMAL = {"proxy": {"socks5_listen": ["127.0.0.1:0"]}}

N = RedisNode

# (url, kind, nodes, service, db, username, password)
VALID = [
    ("redis://127.0.0.1:6379/0", RedisKind.SERVER, [N("127.0.0.1", 6379)], None, 0, None, None),
    ("redis://db.internal", RedisKind.SERVER, [N("db.internal", 6379)], None, 0, None, None),
    ("redis://db:6380/", RedisKind.SERVER, [N("db", 6380)], None, 0, None, None),
    ("REDIS://db/15", RedisKind.SERVER, [N("db", 6379)], None, 15, None, None),
    ("redis://[::1]:7000/2", RedisKind.SERVER, [N("::1", 7000)], None, 2, None, None),
    ("redis://[::1]", RedisKind.SERVER, [N("::1", 6379)], None, 0, None, None),
    ("redis://:pw@db/1", RedisKind.SERVER, [N("db", 6379)], None, 1, None, "pw"),
    ("redis://ops:pw@db/1", RedisKind.SERVER, [N("db", 6379)], None, 1, "ops", "pw"),
    ("redis://ops@db", RedisKind.SERVER, [N("db", 6379)], None, 0, "ops", None),
    ("redis://ops:p%40ss%2Fw@db", RedisKind.SERVER, [N("db", 6379)], None, 0, "ops", "p@ss/w"),
    ("redis://ops:p@ss/w:x@db", RedisKind.SERVER, [N("db", 6379)], None, 0, "ops", "p@ss/w:x"),
    (
        "redis+sentinel://10.0.0.1,10.0.0.2:26380,[fd00::3]/mymaster",
        RedisKind.SENTINEL,
        [N("10.0.0.1", 26379), N("10.0.0.2", 26380), N("fd00::3", 26379)],
        "mymaster",
        0,
        None,
        None,
    ),
    (
        "redis+sentinel://:pw@s1:26379/egress-main/3",
        RedisKind.SENTINEL,
        [N("s1", 26379)],
        "egress-main",
        3,
        None,
        "pw",
    ),
    (
        "redis+cluster://n1:7000,n2:7001,n3:7002",
        RedisKind.CLUSTER,
        [N("n1", 7000), N("n2", 7001), N("n3", 7002)],
        None,
        0,
        None,
        None,
    ),
    ("redis+cluster://ops:pw@n1/0", RedisKind.CLUSTER, [N("n1", 6379)], None, 0, "ops", "pw"),
]


@pytest.mark.parametrize("case", VALID, ids=[case[0] for case in VALID])
def test_each_form_names_its_servers(case: tuple[object, ...]) -> None:
    url, kind, nodes, service, db, username, password = case
    assert isinstance(url, str)
    target = parse_redis_url(url)
    assert (target.kind, list(target.nodes), target.service, target.db) == (
        kind,
        nodes,
        service,
        db,
    )
    assert (target.username, target.password, target.tls) == (username, password, False)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("rediss://db:6380/0", RedisKind.SERVER),
        ("rediss+sentinel://s1/m", RedisKind.SENTINEL),
        ("rediss+cluster://n1:7000", RedisKind.CLUSTER),
    ],
)
def test_rediss_schemes_mean_tls(url: str, kind: RedisKind) -> None:
    target = parse_redis_url(url)
    assert (target.kind, target.tls) == (kind, True)
    assert str(target).startswith(url.split("://")[0] + "://")


def test_unix_socket_with_db_and_credentials() -> None:
    assert parse_redis_url("unix:///run/redis/redis.sock") == RedisTarget(
        RedisKind.UNIX, path="/run/redis/redis.sock"
    )
    target = parse_redis_url("unix://ops:pw@/run/redis.sock?db=4")
    assert (target.path, target.db, target.username, target.password) == (
        "/run/redis.sock",
        4,
        "ops",
        "pw",
    )


# (url, part of the problem, part of the expected form)
INVALID = [
    ("localhost:6379", "unknown scheme none", "redis+sentinel://"),
    ("http://db:6379", "unknown scheme 'http'", "redis+cluster://"),
    ("redis://", "the host is empty", "redis://[user:password@]host"),
    ("redis://db:0/0", "port must be 1-65535", "redis://"),
    ("redis://db:65536", "port must be 1-65535", "redis://"),
    ("redis://db:/0", "empty port", "redis://"),
    ("redis://db:63x9/0", "port must be 1-65535", "redis://"),
    ("redis://db/x", "db 'x' is not a number", "redis://"),
    ("redis://db/-1", "db '-1' is not a number", "redis://"),
    ("redis://db/0/1", "db '0/1'", "redis://"),
    ("redis://db?db=1", "query parameters 'db=1'", "redis://"),
    ("redis://db/0#frag", "fragment", "redis://"),
    ("redis://a:1,b:2/0", "2 hosts (for Sentinel or Cluster use", "redis://"),
    ("redis://db name/0", "not a host name", "redis://"),
    ("redis://[::1/0", "[addr]:port", "redis://"),
    ("redis://[not-v6]:1/0", "not an IPv6 address", "redis://"),
    ("redis://[::1]x/0", "[addr]:port", "redis://"),
    ("redis+sentinel://s1:26379", "no service name", "/service_name[/db]"),
    ("redis+sentinel://s1:26379/", "no service name", "/service_name[/db]"),
    ("redis+sentinel://s1/my master", "service name 'my master'", "redis+sentinel://"),
    ("redis+sentinel://s1/m/x", "db 'x'", "redis+sentinel://"),
    ("redis+sentinel://s1,,s2/m", "host 2 is empty", "redis+sentinel://"),
    ("redis+cluster://n1,n2:99999", "host 2 'n2:99999': port", "redis+cluster://"),
    ("redis+cluster://n1/1", "a Redis Cluster has only db 0", "redis+cluster://"),
    ("redis+cluster://n1?x=1", "query parameters", "redis+cluster://"),
    ("redis+cluster://" + ",".join(f"n{i}" for i in range(65)), "65 hosts", "redis+cluster://"),
    ("unix://run/redis.sock", "is not absolute", "/path/to/redis.sock"),
    ("unix:///run/redis.sock?db=x", "db 'x'", "unix://"),
    ("unix:///run/redis.sock?timeout=1", "only db=N", "unix://"),
]


@pytest.mark.parametrize(("url", "problem", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_each_refusal_says_what_is_wrong_and_what_was_expected(
    url: str, problem: str, expected: str
) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url)
    assert problem in caught.value.problem
    assert expected in caught.value.expected
    assert str(caught.value) == f"{caught.value.problem}; expected {caught.value.expected}"


@pytest.mark.parametrize(("url", "problem", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_no_refusal_shows_the_password(url: str, problem: str, expected: str) -> None:
    scheme, sep, rest = url.partition("://")
    with_login = f"{scheme}{sep}ops:{SECRET}@{rest}" if sep else f"ops:{SECRET}@{url}"
    if scheme == "unix" and rest.startswith("/"):
        with_login = f"unix://ops:{SECRET}@{rest}"
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(with_login)
    assert SECRET not in str(caught.value)


@st.composite
def _urls_with_a_password(draw: st.DrawFn) -> tuple[str, str]:
    password = SECRET + draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"])))
    scheme = draw(st.sampled_from(["redis", "rediss", "redis+sentinel", "redis+cluster", "x"]))
    tail = draw(st.text(alphabet="ab1:/,[]?#=.@ -", max_size=30))
    return f"{scheme}://ops:{password}@{tail}", password


@given(_urls_with_a_password())
def test_any_text_is_parsed_or_refused_without_its_password(case: tuple[str, str]) -> None:
    url, _password = case
    try:
        target = parse_redis_url(url)
    except RedisUrlError as error:
        message = str(error)
    else:
        message = str(target) + repr(target)
    assert SECRET not in message
    assert SECRET not in redact_redis_url(url)


@given(st.text(max_size=60))
def test_random_text_gives_a_target_or_a_url_error(text: str) -> None:
    for url in (text, "redis://" + text, "redis+sentinel://" + text, "unix://" + text):
        with contextlib.suppress(RedisUrlError):
            parse_redis_url(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://ops:pw@db/0", "redis://ops:***@db/0"),
        ("redis://ops@db/0", "redis://ops@db/0"),
        ("redis://ops:p/a@ss@db/0", "redis://ops:***@db/0"),
        ("redis+sentinel://:pw@s1,s2:26380/m/1", "redis+sentinel://:***@s1,s2:26380/m/1"),
        ("redis+cluster://ops:pw@n1:7000,n2:7001", "redis+cluster://ops:***@n1:7000,n2:7001"),
        ("unix://:pw@/run/r.sock?db=1", "unix://:***@/run/r.sock?db=1"),
        ("unix:///run/r@x.sock", "unix:///run/r@x.sock"),
        ("redis://db/0?password=pw&x=1", "redis://db/0?password=***&x=1"),
        ("user:pw@db:6379", "user:***@db:6379"),
        ("redis://db:6379/0", "redis://db:6379/0"),
    ],
)
def test_redaction_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_redis_url(url) == shown


def test_a_target_shows_itself_without_the_password() -> None:
    target = parse_redis_url(f"redis+sentinel://ops:{SECRET}@s1,[::1]:26380/main/2")
    assert str(target) == "redis+sentinel://ops:***@s1:26379,[::1]:26380/main/2"
    assert SECRET not in repr(target)


def test_a_target_checks_itself() -> None:
    """Built by hand (not parsed), a target still refuses what no URL could say."""
    with pytest.raises(RedisUrlError, match="only db 0"):
        RedisTarget(RedisKind.CLUSTER, (N("n1", 7000),), db=1)
    with pytest.raises(RedisUrlError, match="service name"):
        RedisTarget(RedisKind.SENTINEL, (N("s1", 26379),))
    with pytest.raises(RedisUrlError, match="2 hosts"):
        RedisTarget(RedisKind.SERVER, (N("a", 1), N("b", 2)))
    with pytest.raises(RedisUrlError, match="absolute path"):
        RedisTarget(RedisKind.UNIX, path="run/redis.sock")


def test_make_client_refuses_a_bad_url_before_anything_connects() -> None:
    with pytest.raises(RedisUrlError, match="no service name"):
        make_client("redis+sentinel://127.0.0.1:26379", timeout=1.0)


# --- in the config file ------------------------------------------------------------------------


def _redis_problem(url: object, tmp_path: Path) -> str:
    path = tmp_path / "egress.toml"
    value = f'"{url}"' if isinstance(url, str) else str(url)
    path.write_text(f'[proxy]\nsocks5_listen = ["127.0.0.1:0"]\n[redis]\nurl = {value}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.key == "redis.url"
    assert problem.file == str(path)
    rendered = str(caught.value)
    assert SECRET not in rendered
    return rendered


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (f"redis+sentinel://:{SECRET}@127.0.0.1:26379", "no service name"),
        (f"redis+cluster://ops:{SECRET}@n1:7000/3", "only db 0"),
        (f"redis://:{SECRET}@db:x/0", "port must be 1-65535"),
        (f"redis://:p/{SECRET}@db:x/0", "port must be 1-65535"),
        (f"http://:{SECRET}@db", "unknown scheme 'http'"),
        (6379, "a Redis URL string"),
    ],
)
def test_config_names_the_key_the_file_and_what_is_wrong(
    tmp_path: Path, url: object, said: str
) -> None:
    rendered = _redis_problem(url, tmp_path)
    assert said in rendered
    assert "redis.url" in rendered


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis+sentinel://:{SECRET}@s1,s2/main", "redis+sentinel://:***@s1,s2/main"),
        (f"redis+cluster://ops:{quote(SECRET)}@n1:7000", "redis+cluster://ops:***@n1:7000"),
        (f"redis://ops:a/{SECRET}@db/0", "redis://ops:***@db/0"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    ],
)
def test_config_accepts_each_form_and_displays_it_without_the_password(
    url: str, shown: str
) -> None:
    config = parse_config({**MINIMAL, "redis": {"url": url}}, source="inline")
    assert config.redis.url == url
    assert config.redis.display_url == shown
