"""Snapshot tests of the firewall plan (no root, no iptables)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from egress.config import Config, parse_config
from egress.firewall.backend import Op, TableState, parse_save
from egress.firewall.plan import build_plan, tag_verifies
from egress.firewall.sync import app_counters, diff_table


def config(**firewall: Any) -> Config:
    data: dict[str, Any] = {
        "proxy": {
            "socks5_listen": ["127.0.0.1:1080", "[::1]:1080"],
            "http_listen": ["0.0.0.0:3128"],
            "transparent_listen": "127.0.0.1:15001",
        },
        "firewall": {"sandbox_uids": ["10000-19999", "30000"], **firewall},
        "app": [
            {"name": "blog", "uids": ["10001"], "allow": []},
            {"name": "shop", "uids": ["10010-10019", "30000"], "allow": []},
            {"name": "legacy", "uids": ["5000-5001", "10020"], "allow": []},
        ],
    }
    return parse_config(data, source=str(Path("test.toml")))


def lines(family: str, table: str, **firewall: Any) -> list[str]:
    plan = build_plan(config(**firewall)).table(family, table)  # type: ignore[arg-type]
    jump = [f"-A OUTPUT {plan.jump}"] if plan.jump else []
    body = [rule.line for rules in plan.chains.values() for rule in rules]
    return [_untag(line) for line in [*jump, *body]]


def _untag(line: str) -> str:
    """The snapshot shows rules without their hashes (checked separately)."""
    line = re.sub(r'-m comment --comment "egress plan=[0-9a-f]+" ', "", line)
    return re.sub(r" h=[0-9a-f]+", "", line)


EXPLICIT_V4 = [
    "-A OUTPUT -j EGRESS-OUTPUT",
    '-A EGRESS-OUTPUT -m owner --uid-owner 10000-19999 -m comment --comment "egress"'
    " -j EGRESS-SANDBOX",
    '-A EGRESS-OUTPUT -m owner --uid-owner 30000 -m comment --comment "egress" -j EGRESS-SANDBOX',
    '-A EGRESS-SANDBOX -d 127.0.0.1/32 -p tcp -m tcp --dport 1080 -m comment --comment "egress"'
    " -j ACCEPT",
    "-A EGRESS-SANDBOX -p tcp -m tcp --dport 3128 -m addrtype --dst-type LOCAL"
    ' -m comment --comment "egress" -j ACCEPT',
    '-A EGRESS-SANDBOX -m owner --uid-owner 10001 -m comment --comment "egress app=blog"'
    " -j EGRESS-REJECT",
    '-A EGRESS-SANDBOX -m owner --uid-owner 10010-10019 -m comment --comment "egress app=shop"'
    " -j EGRESS-REJECT",
    '-A EGRESS-SANDBOX -m owner --uid-owner 10020 -m comment --comment "egress app=legacy"'
    " -j EGRESS-REJECT",
    '-A EGRESS-SANDBOX -m owner --uid-owner 30000 -m comment --comment "egress app=shop"'
    " -j EGRESS-REJECT",
    '-A EGRESS-SANDBOX -m comment --comment "egress app=_unassigned" -j EGRESS-REJECT',
    '-A EGRESS-REJECT -p tcp -m comment --comment "egress" -j REJECT --reject-with tcp-reset',
    '-A EGRESS-REJECT -m comment --comment "egress" -j REJECT --reject-with icmp-admin-prohibited',
]


def test_explicit_ipv4_filter() -> None:
    assert lines("ipv4", "filter") == EXPLICIT_V4


def test_explicit_ipv6_filter_has_v6_listener_and_icmp6() -> None:
    v6 = lines("ipv6", "filter")
    assert (
        '-A EGRESS-SANDBOX -d ::1/128 -p tcp -m tcp --dport 1080 -m comment --comment "egress"'
        " -j ACCEPT"
    ) in v6
    assert not any("127.0.0.1" in line or "3128" in line for line in v6)
    assert v6[-1].endswith("-j REJECT --reject-with icmp6-adm-prohibited")


def test_explicit_mode_has_no_nat() -> None:
    plan = build_plan(config())
    assert plan.table("ipv4", "nat").chains == {}
    assert plan.table("ipv4", "nat").jump is None


def test_transparent_nat_and_accept() -> None:
    assert lines("ipv4", "nat", mode="transparent") == [
        "-A OUTPUT -j EGRESS-NAT",
        '-A EGRESS-NAT -m owner --uid-owner 10000-19999 -m comment --comment "egress"'
        " -j EGRESS-NAT-SANDBOX",
        '-A EGRESS-NAT -m owner --uid-owner 30000 -m comment --comment "egress"'
        " -j EGRESS-NAT-SANDBOX",
        "-A EGRESS-NAT-SANDBOX -d 127.0.0.1/32 -p tcp -m tcp --dport 1080"
        ' -m comment --comment "egress" -j RETURN',
        "-A EGRESS-NAT-SANDBOX -p tcp -m tcp --dport 3128 -m addrtype --dst-type LOCAL"
        ' -m comment --comment "egress" -j RETURN',
        '-A EGRESS-NAT-SANDBOX -p tcp -m comment --comment "egress" -j REDIRECT --to-ports 15001',
    ]
    v4 = lines("ipv4", "filter", mode="transparent")
    assert (
        "-A EGRESS-SANDBOX -d 127.0.0.1/32 -p tcp -m tcp --dport 15001"
        ' -m comment --comment "egress" -j ACCEPT'
    ) in v4
    # A v4-only transparent listener: v6 sandbox TCP is rejected, not redirected (warned).
    plan = build_plan(config(mode="transparent"))
    assert plan.table("ipv6", "nat").chains == {}
    assert any("ipv6 TCP from sandbox uids is rejected" in w for w in plan.warnings)


def test_app_outside_sandbox_ranges_is_warned_and_clipped() -> None:
    plan = build_plan(config())
    assert [w for w in plan.warnings if "'legacy'" in w] == [
        "app 'legacy': uids 5000-5001 are not (all) inside firewall.sandbox_uids; traffic from"
        " the uids outside is not confined by the firewall"
    ]
    assert plan.apps == ("blog", "shop", "legacy")


def test_tags_verify_and_hand_edits_do_not() -> None:
    plan = build_plan(config())
    for rules in plan.table("ipv4", "filter").chains.values():
        for rule in rules:
            assert tag_verifies(rule.line), rule.line
    forged = plan.table("ipv4", "filter").chains["EGRESS-SANDBOX"][0].line.replace("1080", "1081")
    assert not tag_verifies(forged)
    assert not tag_verifies("-A EGRESS-SANDBOX -j ACCEPT")


def test_plan_hash_changes_with_config_only() -> None:
    a = build_plan(config()).table("ipv4", "filter")
    b = build_plan(config()).table("ipv4", "filter")
    c = build_plan(config(sandbox_uids=["10000-19999"])).table("ipv4", "filter")
    assert a.plan_hash == b.plan_hash != c.plan_hash


def _state_of(plan_lines: list[str]) -> TableState:
    text = "*filter\n:OUTPUT ACCEPT [0:0]\n" + "\n".join(plan_lines) + "\nCOMMIT\n"
    return parse_save(text, "ipv4", "filter")


def test_diff_of_installed_plan_is_empty_and_edits_are_minimal() -> None:
    plan = build_plan(config()).table("ipv4", "filter")
    installed = [f"-A OUTPUT {plan.jump}"]
    for name, rules in plan.chains.items():
        installed.append(f":{name} - [0:0]")
        installed.extend(rule.line for rule in rules)
    chains = "\n".join(line for line in installed if line.startswith(":"))
    body = [line for line in installed if not line.startswith(":")]
    state = parse_save(
        "*filter\n:OUTPUT ACCEPT [0:0]\n" + chains + "\n" + "\n".join(body) + "\nCOMMIT\n",
        "ipv4",
        "filter",
    )
    assert diff_table(plan, state) == []
    # Remove the blog rule, add a hand-made ACCEPT: exactly one delete and one insert.
    blog = next(line for line in body if "app=blog" in line)
    edited = [line for line in body if line != blog]
    edited.insert(1, "-A EGRESS-SANDBOX -j ACCEPT")
    state = parse_save(
        "*filter\n:OUTPUT ACCEPT [0:0]\n" + chains + "\n" + "\n".join(edited) + "\nCOMMIT\n",
        "ipv4",
        "filter",
    )
    ops = diff_table(plan, state)
    assert sorted(op.kind for op in ops) == ["delete", "insert"]


def test_diff_on_empty_table_creates_chains_and_one_jump() -> None:
    plan = build_plan(config()).table("ipv4", "filter")
    ops = diff_table(plan, _state_of(["-A OUTPUT -j ACCEPT"]))
    assert [op for op in ops if op.chain == "OUTPUT"] == [
        Op("insert", "OUTPUT", plan.jump or "", 1)
    ]
    assert {op.chain for op in ops if op.kind == "declare"} == set(plan.chains)


def test_parse_save_counters_and_foreign_chains() -> None:
    text = """# Generated by iptables-save
*filter
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:EGRESS-SANDBOX - [0:0]
[5:300] -A OUTPUT -j DOCKER
[7:420] -A EGRESS-SANDBOX -m owner --uid-owner 10001 -m comment --comment "egress app=blog h=0" \
-j EGRESS-REJECT
[2:120] -A EGRESS-SANDBOX -m comment --comment "egress app=_unassigned h=0" -j EGRESS-REJECT
COMMIT
"""
    state = parse_save(text, "ipv4", "filter")
    assert list(state.chains) == ["EGRESS-SANDBOX"]
    assert state.jumps() == []
    assert app_counters([state], ["blog", "shop"]) == {"blog": 7, "shop": 0, "_unassigned": 2}


@pytest.mark.parametrize(
    ("ops", "text"),
    [
        (Op("declare", "EGRESS-X"), ":EGRESS-X - [0:0]"),
        (Op("insert", "OUTPUT", "-j EGRESS-X", 1), "-I OUTPUT 1 -j EGRESS-X"),
        (Op("delete", "EGRESS-X", position=3), "-D EGRESS-X 3"),
        (Op("delete", "OUTPUT", "-j EGRESS-X"), "-D OUTPUT -j EGRESS-X"),
        (Op("delete_chain", "EGRESS-X"), "-X EGRESS-X"),
    ],
)
def test_restore_lines(ops: Op, text: str) -> None:
    assert ops.restore_line() == text


def test_dual_stack_transparent_listener_redirects_both_families() -> None:
    data: dict[str, Any] = {
        "proxy": {"socks5_listen": ["127.0.0.1:1080"], "transparent_listen": "[::]:15001"},
        "firewall": {"sandbox_uids": ["10000-19999"], "mode": "transparent"},
        "app": [{"name": "blog", "uids": ["10001"], "allow": []}],
    }
    plan = build_plan(parse_config(data, source="test.toml"))
    for family in ("ipv4", "ipv6"):
        nat = [rule.line for rules in plan.table(family, "nat").chains.values() for rule in rules]
        assert any("-p tcp" in line and "REDIRECT --to-ports 15001" in line for line in nat)
        accepts = [
            rule.line
            for rule in plan.table(family, "filter").chains["EGRESS-SANDBOX"]
            if "--dport 15001" in rule.line
        ]
        assert len(accepts) == 1 and "--dst-type LOCAL" in accepts[0] and "ACCEPT" in accepts[0]
    assert not any("transparent mode" in warning for warning in plan.warnings)
