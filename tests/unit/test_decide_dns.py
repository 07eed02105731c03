"""What the sandbox DNS listener may answer, by policy (rules.decide.decide_dns_name /
decide_answer and CompiledRules.name_rules), and what its config and firewall plan look like
(proxy.dns_listen in egress.config and egress.firewall.plan)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest

from egress.config import Config, parse_config
from egress.errors import ConfigError
from egress.firewall.plan import build_plan
from rules.apps import App, Mode, UidRange
from rules.decide import AppPolicy, Reason, decide_answer, decide_dns_name
from rules.match import PORT_INDEX_FROM, CompiledRules
from rules.parse import parse_rule
from rules.special import SpecialExceptions

IPAddress = IPv4Address | IPv6Address

OPENED = SpecialExceptions.parse(["10.8.0.0/16", "fd08::/16"])
NONE_OPENED = SpecialExceptions()
PUBLIC = ip_address("93.184.215.14")  # outside every special-purpose range


def policy(
    allow: list[str], *, mode: Mode = Mode.ENFORCE, exceptions: SpecialExceptions = NONE_OPENED
) -> AppPolicy:
    app = App("blog", (UidRange(10001, 10001),), tuple(parse_rule(r) for r in allow), mode)
    return AppPolicy.compile(app, exceptions)


def answerable(app: AppPolicy, host: str) -> str | None:
    """The rule the name is answered by, or None when it is not answerable."""
    plan = decide_dns_name(app, host)
    assert plan.must_resolve is plan.decision.allowed
    return plan.decision.rule if plan.must_resolve else None


# --- names ----------------------------------------------------------------------------------

RULES = ["api.example.com:443", "*.example.org:80,443", "ssh.example.net:22"]


@pytest.mark.parametrize(
    ("host", "rule"),
    [
        ("api.example.com", "api.example.com:443"),
        ("www.example.org", "*.example.org:80,443"),
        ("a.b.example.org", "*.example.org:80,443"),
        ("ssh.example.net", "ssh.example.net:22"),  # a name rule on any port counts
        ("example.org", None),  # a wildcard covers below the suffix, not the suffix itself
        ("www.api.example.com", None),  # an exact rule covers only itself
        ("example.com", None),
        ("notexample.org", None),
        ("evil.example", None),
    ],
)
def test_names_answerable_by_a_name_rule(host: str, rule: str | None) -> None:
    assert answerable(policy(RULES), host) == rule


def test_denied_name_plan() -> None:
    plan = decide_dns_name(policy(RULES), "exfil.attacker.example")
    assert not plan.must_resolve and plan.rules == ()
    assert (plan.decision.allowed, plan.decision.reason) == (False, Reason.NOT_ALLOWED)


def test_address_rules_do_not_make_names_answerable() -> None:
    """Which name lands in an address rule is unknown until it is resolved, and resolving any
    name on an app's say-so is a way out for data."""
    app = policy(["0.0.0.0/0:443", "[::]/0:443", "203.0.113.0/24:*", "10.8.0.0/16:5432"])
    for host in ("anything.example", "c2VjcmV0.exfil.example", "www.example.org"):
        assert answerable(app, host) is None


def test_report_mode_answers_reported() -> None:
    app = policy(["api.example.com:443"], mode=Mode.REPORT)
    plan = decide_dns_name(app, "unlisted.example")
    assert plan.must_resolve and plan.rules == ()
    assert (plan.decision.reported, plan.decision.reason) == (True, Reason.NOT_ALLOWED)
    answer = decide_answer(app, PUBLIC, plan)
    assert answer.allowed and answer.reported
    listed = decide_dns_name(app, "api.example.com")
    assert listed.decision.rule == "api.example.com:443" and not listed.decision.reported


@pytest.mark.parametrize("address", ["169.254.169.254", "127.0.0.1", "10.8.0.5", "fd08::5"])
def test_report_mode_never_opens_a_special_address(address: str) -> None:
    app = policy(["api.example.com:443"], mode=Mode.REPORT, exceptions=OPENED)
    decision = decide_answer(app, ip_address(address), decide_dns_name(app, "unlisted.example"))
    assert not decision.allowed and not decision.reported
    assert decision.reason is Reason.SPECIAL_ADDRESS and decision.detail


# --- special-purpose answers ----------------------------------------------------------------


def answer_for(app: AppPolicy, host: str, address: str) -> tuple[bool, str | None]:
    plan = decide_dns_name(app, host)
    assert plan.must_resolve
    decision = decide_answer(app, ip_address(address), plan)
    if not decision.allowed:
        assert decision.reason is Reason.SPECIAL_ADDRESS and decision.detail
    return decision.allowed, decision.rule


def test_public_address_is_answered_by_the_name_rule() -> None:
    app = policy(["*.cdn.example:443"], exceptions=OPENED)
    assert answer_for(app, "a.cdn.example", "93.184.215.14") == (True, "*.cdn.example:443")
    assert answer_for(app, "a.cdn.example", "2606:2800:21f::1") == (True, "*.cdn.example:443")
    # Documentation ranges are special-purpose too: a wildcard rule never reaches them.
    assert answer_for(app, "a.cdn.example", "203.0.113.7") == (False, None)


def test_special_address_needs_an_opened_range_and_an_exact_host_rule() -> None:
    exact = ["db.internal.example:5432"]
    assert answer_for(policy(exact, exceptions=OPENED), "db.internal.example", "10.8.0.5") == (
        True,
        "db.internal.example:5432",
    )
    assert answer_for(policy(exact, exceptions=OPENED), "db.internal.example", "fd08::5") == (
        True,
        "db.internal.example:5432",
    )
    # Not opened: no rule reaches it.
    assert answer_for(policy(exact), "db.internal.example", "10.8.0.5") == (False, None)
    # Opened range, but the address lies outside it.
    assert answer_for(policy(exact, exceptions=OPENED), "db.internal.example", "10.9.0.5") == (
        False,
        None,
    )
    for address in ("169.254.169.254", "127.0.0.1", "100.64.0.1", "::1"):
        assert answer_for(policy(exact, exceptions=OPENED), "db.internal.example", address) == (
            False,
            None,
        )


def test_unopened_denial_names_the_range() -> None:
    app = policy(["metadata.example:80"])
    plan = decide_dns_name(app, "metadata.example")
    decision = decide_answer(app, ip_address("169.254.169.254"), plan)
    assert not decision.allowed and decision.detail is not None
    assert "169.254.169.254" in decision.detail and "link-local" in decision.detail


def test_wildcard_rule_never_reaches_an_opened_special_address() -> None:
    app = policy(["*.internal.example:5432"], exceptions=OPENED)
    assert answer_for(app, "db.internal.example", "10.8.0.5") == (False, None)


def test_opened_address_rule_lets_a_special_answer_through() -> None:
    app = policy(["*.internal.example:5432", "10.8.0.0/24:6379"], exceptions=OPENED)
    # On any port: the connection is judged again, port and all, when the app dials it.
    assert answer_for(app, "db.internal.example", "10.8.0.5") == (True, "10.8.0.0/24:6379")
    assert answer_for(app, "db.internal.example", "10.8.1.5") == (False, None)


def test_wide_address_rule_does_not_open_a_special_answer() -> None:
    app = policy(
        ["*.internal.example:5432", "0.0.0.0/0:5432", "10.0.0.0/8:5432"], exceptions=OPENED
    )
    assert answer_for(app, "db.internal.example", "10.8.0.5") == (False, None)


def test_exact_rule_among_wildcards_opens_it() -> None:
    app = policy(["*.internal.example:443", "db.internal.example:5432"], exceptions=OPENED)
    plan = decide_dns_name(app, "db.internal.example")
    assert plan.decision.rule == "db.internal.example:5432"
    assert decide_answer(app, ip_address("10.8.0.5"), plan).allowed
    other = decide_dns_name(app, "www.internal.example")
    assert not decide_answer(app, ip_address("10.8.0.5"), other).allowed


# --- CompiledRules.name_rules ---------------------------------------------------------------


def texts(rules: tuple[Any, ...]) -> list[str]:
    return [rule.text for rule in rules]


def test_name_rules_exact_first_then_deepest_wildcard() -> None:
    compiled = CompiledRules.compile(
        parse_rule(r)
        for r in [
            "*.example.com:22",
            "*.b.example.com:80",
            "a.b.example.com:443",
            "other.example.com:443",
            "*.com:8443",
            "a.b.example.com:8000-8100",
            "*.b.example.com:81",
        ]
    )
    assert texts(compiled.name_rules("a.b.example.com")) == [
        "a.b.example.com:443",
        "a.b.example.com:8000-8100",
        "*.b.example.com:80",
        "*.b.example.com:81",
        "*.example.com:22",
        "*.com:8443",
    ]
    assert texts(compiled.name_rules("b.example.com")) == ["*.example.com:22", "*.com:8443"]
    assert compiled.name_rules("example.org") == ()
    assert CompiledRules.compile(()).name_rules("a.b.example.com") == ()


@pytest.mark.parametrize("count", [PORT_INDEX_FROM - 1, PORT_INDEX_FROM, PORT_INDEX_FROM + 20])
def test_name_rules_of_a_target_with_many_rules(count: int) -> None:
    """From PORT_INDEX_FROM rules on one target its ports are indexed; every rule that allows
    some port is still found (ports given in ascending order here)."""
    rules = [parse_rule(f"x.example.com:{1000 + i}") for i in range(count)]
    wildcard = parse_rule("*.example.com:22")
    compiled = CompiledRules.compile([*rules, wildcard])
    assert compiled.name_rules("x.example.com") == (*rules, wildcard)
    app = AppPolicy.compile(
        App("blog", (UidRange(10001, 10001),), (*rules, wildcard), Mode.ENFORCE), OPENED
    )
    plan = decide_dns_name(app, "x.example.com")
    assert plan.decision.rule == "x.example.com:1000"
    assert decide_answer(app, ip_address("10.8.0.5"), plan).allowed  # exact rules among them


def test_name_rules_with_a_port_index_include_shadowed_rules() -> None:
    """Every rule of the target, even one whose ports an earlier rule already covers."""
    wide = parse_rule("x.example.com:1-100")
    shadowed = [parse_rule(f"x.example.com:{50 + i}") for i in range(PORT_INDEX_FROM)]
    extra = parse_rule("x.example.com:443")
    compiled = CompiledRules.compile([wide, *shadowed, extra])
    assert compiled.name_rules("x.example.com") == (wide, *shadowed, extra)


def descending(count: int) -> list[Any]:
    return [parse_rule(f"x.example.com:{2000 - i}") for i in range(count)]


def test_name_rules_keep_config_order_below_the_port_index() -> None:
    rules = descending(PORT_INDEX_FROM - 1)
    assert CompiledRules.compile(rules).name_rules("x.example.com") == tuple(rules)


def test_name_rules_keep_config_order_with_a_port_index() -> None:
    """The rule decide_dns_name reports (the first) does not change with the count (it once
    did: port order from PORT_INDEX_FROM rules on)."""
    rules = descending(PORT_INDEX_FROM)
    assert CompiledRules.compile(rules).name_rules("x.example.com") == tuple(rules)


# --- config: proxy.dns_listen ---------------------------------------------------------------


def config_data(**proxy: Any) -> dict[str, Any]:
    return {
        "proxy": {
            "socks5_listen": ["127.0.0.1:1080"],
            "http_listen": [],
            "transparent_listen": "127.0.0.1:15001",
            "dns_listen": "127.0.0.1:15053",
            **proxy,
        },
        "firewall": {"sandbox_uids": ["10000-19999"], "mode": "transparent"},
        "app": [
            {"name": "blog", "uids": ["10001"], "allow": []},
            {"name": "shop", "uids": ["10010-10019"], "allow": []},
        ],
    }


def parsed(data: dict[str, Any]) -> Config:
    return parse_config(data, source="test.toml")


def config_problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parsed(data)
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    "address", ["0.0.0.0:53", "[::]:53", "10.1.2.3:53", "192.0.2.1:15053", "[2001:db8::1]:53"]
)
def test_dns_listen_must_be_loopback(address: str) -> None:
    problems = [p for p in config_problems(config_data(dns_listen=address)) if "dns_listen" in p]
    assert len(problems) == 1
    assert "proxy.dns_listen" in problems[0] and "loopback" in problems[0]
    assert address in problems[0]


@pytest.mark.parametrize("address", ["127.0.0.1:15053", "127.0.0.53:53", "[::1]:15053"])
def test_dns_listen_loopback_is_accepted(address: str) -> None:
    config = parsed(config_data(dns_listen=address))
    assert config.proxy.dns_listen is not None
    assert str(config.proxy.dns_listen) == address


@pytest.mark.parametrize(
    ("proxy", "other"),
    [
        ({"socks5_listen": ["127.0.0.1:15053"]}, "proxy.socks5_listen[0]"),
        ({"http_listen": ["127.0.0.1:15053"]}, "proxy.http_listen[0]"),
        ({"transparent_listen": "127.0.0.1:15053"}, "proxy.transparent_listen"),
    ],
)
def test_dns_listen_on_another_listeners_address_is_an_error(
    proxy: dict[str, Any], other: str
) -> None:
    (problem,) = config_problems(config_data(**proxy))
    assert "proxy.dns_listen" in problem and other in problem


def test_dns_listen_on_the_admin_address_is_an_error() -> None:
    data = config_data()
    data["admin"] = {"listen": "127.0.0.1:15053"}
    (problem,) = config_problems(data)
    assert "admin.listen" in problem and "proxy.dns_listen" in problem


# --- firewall plan --------------------------------------------------------------------------


def chain(config: Config, family: str, table: str, name: str) -> list[str]:
    plan = build_plan(config).table(family, table)  # type: ignore[arg-type]
    return [rule.line for rule in plan.chains.get(name, ())]


def test_transparent_plan_redirects_dns_before_the_catch_all() -> None:
    nat = chain(parsed(config_data()), "ipv4", "nat", "EGRESS-NAT-SANDBOX")
    udp = next(i for i, line in enumerate(nat) if "-p udp -m udp --dport 53 " in line)
    tcp = next(i for i, line in enumerate(nat) if "-p tcp -m tcp --dport 53 " in line)
    assert nat[udp].endswith("-j REDIRECT --to-ports 15053")
    assert nat[tcp].endswith("-j REDIRECT --to-ports 15053")
    catch_all = next(i for i, line in enumerate(nat) if line.endswith("REDIRECT --to-ports 15001"))
    assert catch_all == len(nat) - 1
    assert max(udp, tcp) < catch_all
    assert "-A EGRESS-NAT-SANDBOX -p tcp -m comment" in nat[catch_all]
    # The DNS listener's own TCP port is left alone (a client may ask it directly).
    own = next(i for i, line in enumerate(nat) if "--dport 15053" in line)
    assert "-d 127.0.0.1/32 -p tcp" in nat[own] and nat[own].endswith("-j RETURN")
    assert own < min(udp, tcp)


def test_transparent_plan_accepts_dns_udp_before_the_rejects() -> None:
    sandbox = chain(parsed(config_data()), "ipv4", "filter", "EGRESS-SANDBOX")
    accept = [
        i
        for i, line in enumerate(sandbox)
        if "-d 127.0.0.1/32 -p udp -m udp --dport 15053" in line and line.endswith("-j ACCEPT")
    ]
    tcp_accept = [
        i
        for i, line in enumerate(sandbox)
        if "-d 127.0.0.1/32 -p tcp -m tcp --dport 15053" in line and line.endswith("-j ACCEPT")
    ]
    rejects = [i for i, line in enumerate(sandbox) if line.endswith("-j EGRESS-REJECT")]
    assert len(accept) == 1 and len(tcp_accept) == 1 and len(rejects) == 3  # 2 apps + catch-all
    assert max(accept[0], tcp_accept[0]) < min(rejects)
    # Only the DNS listener gets a UDP accept: nothing else of UDP is let out. Before it, each
    # app range's queries are marked with the range's first uid (the listener's sender
    # identity), by rules without an app label (they count no bypasses).
    udp = [line for line in sandbox if "-p udp" in line]
    assert udp[-1] == sandbox[accept[0]]
    marks = udp[:-1]
    assert len(marks) == 2
    for line, (uids, first) in zip(marks, (("10001", 10001), ("10010-10019", 10010)), strict=True):
        assert f"--uid-owner {uids} " in line and "app=" not in line
        assert line.endswith(f"-j MARK --set-xmark {hex(first)}/0xffffffff")


def test_v4_dns_listener_adds_nothing_to_ipv6() -> None:
    config = parsed(config_data())
    v6 = build_plan(config).table("ipv6", "filter")
    assert not any("udp" in rule.line for rules in v6.chains.values() for rule in rules)
    assert build_plan(config).table("ipv6", "nat").chains == {}


def test_ipv6_dns_listener() -> None:
    config = parsed(config_data(dns_listen="[::1]:15053", transparent_listen="[::]:15001"))
    plan = build_plan(config)
    nat6 = chain(config, "ipv6", "nat", "EGRESS-NAT-SANDBOX")
    assert sum("--dport 53 " in line and "REDIRECT --to-ports 15053" in line for line in nat6) == 2
    filter6 = chain(config, "ipv6", "filter", "EGRESS-SANDBOX")
    assert any("-d ::1/128 -p udp -m udp --dport 15053" in line for line in filter6)
    nat4 = chain(config, "ipv4", "nat", "EGRESS-NAT-SANDBOX")
    assert not any("--dport 53 " in line for line in nat4)
    assert any("ipv4 DNS from sandbox uids is rejected" in w for w in plan.warnings)


def test_explicit_mode_adds_nothing_for_dns_listen() -> None:
    with_dns = config_data()
    without = config_data()
    del without["proxy"]["dns_listen"]
    for data in (with_dns, without):
        data["firewall"]["mode"] = "explicit"
    a, b = build_plan(parsed(with_dns)), build_plan(parsed(without))
    assert a.tables == b.tables
    assert not any("DNS" in warning for warning in a.warnings)
    assert all(t.chains == {} for t in a.tables if t.table == "nat")


def test_v4_dns_listener_with_a_dual_stack_transparent_listener_warns() -> None:
    plan = build_plan(parsed(config_data(transparent_listen="[::]:15001")))
    dns_warnings = [w for w in plan.warnings if "DNS" in w]
    assert dns_warnings == [
        "transparent mode: ipv6 DNS from sandbox uids is rejected, not answered"
        " (proxy.dns_listen 127.0.0.1:15053 is ipv4 only)"
    ]
    nat6 = chain(
        parsed(config_data(transparent_listen="[::]:15001")), "ipv6", "nat", "EGRESS-NAT-SANDBOX"
    )
    assert nat6 and not any("--dport 53 " in line for line in nat6)
    same_family = build_plan(parsed(config_data()))
    assert not any("DNS" in w for w in same_family.warnings)
