"""The firewall plan: config in, desired iptables rules out. Pure: no I/O, no clock.

Every rule is emitted as the exact line ``iptables-save`` prints for it (verified against the
legacy and the nf_tables variants of iptables 1.8), so finding drift is a text comparison of
what ``*-save`` reads back with what is planned, and applying is feeding the same lines to
``*-restore``. The options therefore appear in the order iptables-save prints them:
``-d``, ``-o``, ``-p``, the matches in the order given, then ``-j``.

Layout per family (the only changes to built-in chains are one jump per table)::

    filter OUTPUT        -I 1 -j EGRESS-OUTPUT      (first: an earlier ACCEPT by other
                                                      software cannot let sandbox traffic out)
    EGRESS-OUTPUT        -m owner --uid-owner R -j EGRESS-SANDBOX      (per sandbox range)
    EGRESS-SANDBOX       ACCEPT to each proxy TCP listener of the family,
                         then per app range: -m owner --uid-owner R -j EGRESS-REJECT
                         (commented "egress app=NAME"; its counter is the app's bypass count),
                         then a catch-all for sandbox uids in no app (app=_unassigned)
    EGRESS-REJECT        TCP: reset; everything else (UDP, DNS, ICMP): admin-prohibited
    nat OUTPUT           (transparent mode) -I 1 -j EGRESS-NAT
    EGRESS-NAT           -m owner --uid-owner R -j EGRESS-NAT-SANDBOX
    EGRESS-NAT-SANDBOX   RETURN for the proxy's own listeners, then (with proxy.dns_listen)
                         REDIRECT UDP and TCP to port 53 to the DNS listener, then REDIRECT
                         all TCP to the transparent listener

With ``proxy.dns_listen`` in transparent mode, EGRESS-SANDBOX also accepts UDP to the DNS
listener (its TCP side is one more proxy listener): after the nat REDIRECT, the filter table sees
the rewritten destination, so those accepts are what let redirected DNS through and nothing else.
Before the accept, each app range's datagrams are marked with the range's first uid
(``-j MARK --set-xmark``), which the listener reads as the sender's identity.

Every rule carries a comment ``egress [app=NAME ]h=HASH`` where HASH covers the rule's chain and
content, so a rule in our chains whose tag does not verify was made by hand. The OUTPUT jump's
comment ``egress plan=HASH`` carries the hash of the whole table's plan: when the kernel holds
the same plan hash but different rules, the difference is drift (someone edited our chains),
not a config change, and is counted as such.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from egress.config import Config, FirewallMode, ListenAddress
from rules.apps import UidRange

__all__ = [
    "CHAIN_PREFIX",
    "FAMILIES",
    "JUMP_CHAIN",
    "TABLES",
    "UNASSIGNED_APP",
    "Family",
    "FirewallPlan",
    "PlannedRule",
    "Table",
    "TablePlan",
    "build_plan",
    "dns_mark",
    "parse_plan_tag",
    "parse_tag",
    "rule_hash",
    "tag_verifies",
]

Family = Literal["ipv4", "ipv6"]
Table = Literal["filter", "nat"]
FAMILIES: Final[tuple[Family, ...]] = ("ipv4", "ipv6")
TABLES: Final[tuple[Table, ...]] = ("filter", "nat")  # applied in this order: filter first

CHAIN_PREFIX: Final = "EGRESS-"
"""Every chain whose name starts with this is ours: created, rewritten and deleted by us only."""

OUTPUT_CHAIN: Final = "EGRESS-OUTPUT"
SANDBOX_CHAIN: Final = "EGRESS-SANDBOX"
REJECT_CHAIN: Final = "EGRESS-REJECT"
NAT_CHAIN: Final = "EGRESS-NAT"
NAT_SANDBOX_CHAIN: Final = "EGRESS-NAT-SANDBOX"
JUMP_CHAIN: Final[dict[Table, str]] = {"filter": OUTPUT_CHAIN, "nat": NAT_CHAIN}

UNASSIGNED_APP: Final = "_unassigned"
"""The app label of the catch-all rule: sandbox uids that belong to no app."""

_HASH_LEN: Final = 10
_TAG_RE: Final = re.compile(r'-m comment --comment "egress (?:app=([a-z0-9_-]+) )?h=([0-9a-f]+)"')
_PLAN_TAG_RE: Final = re.compile(r'-m comment --comment "egress plan=([0-9a-f]+)"')


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def _body(before: str, after: str) -> str:
    return " ".join(part for part in (before.strip(), after.strip()) if part)


def rule_hash(chain: str, body: str, app: str | None) -> str:
    """The tag of a rule: covers its chain, its matches and target, and its app label."""
    return _short_hash(f"{chain}\0{body}\0{app or ''}")


@dataclass(frozen=True, slots=True)
class PlannedRule:
    """One rule: ``matches`` and ``target`` as iptables-save prints them (without the comment)."""

    chain: str
    matches: str  # e.g. "-d 127.0.0.1/32 -p tcp -m tcp --dport 1080"; may be empty
    target: str  # e.g. "-j ACCEPT"
    app: str | None = None

    @property
    def tag(self) -> str:
        return rule_hash(self.chain, _body(self.matches, self.target), self.app)

    @property
    def comment(self) -> str:
        app = f"app={self.app} " if self.app else ""
        return f"egress {app}h={self.tag}"

    @property
    def spec(self) -> str:
        """The rule without ``-A CHAIN``: what ``-I CHAIN N``/``-D CHAIN`` take."""
        matches = f"{self.matches} " if self.matches else ""
        return f'{matches}-m comment --comment "{self.comment}" {self.target}'

    @property
    def line(self) -> str:
        """Exactly what ``iptables-save`` prints for this rule."""
        return f"-A {self.chain} {self.spec}"


def parse_tag(line: str) -> tuple[str | None, str] | None:
    """``(app, hash)`` from a saved rule line carrying our tag, else ``None``."""
    match = _TAG_RE.search(line)
    if match is None:
        return None
    return match[1], match[2]


def tag_verifies(line: str) -> bool:
    """Whether a saved ``-A CHAIN ...`` line carries a tag that matches its content (a rule we
    wrote, possibly for another config) rather than no tag or a copied one (made by hand)."""
    match = _TAG_RE.search(line)
    if match is None or not line.startswith("-A "):
        return False
    chain, _, rest = line[3:].partition(" ")
    offset = 4 + len(chain)
    body = _body(rest[: match.start() - offset], rest[match.end() - offset :])
    return rule_hash(chain, body, match[1]) == match[2]


def parse_plan_tag(line: str) -> str | None:
    """The plan hash from the comment of an OUTPUT jump we installed, else ``None``."""
    match = _PLAN_TAG_RE.search(line)
    return None if match is None else match[1]


@dataclass(frozen=True, slots=True)
class TablePlan:
    """Our chains in one (family, table), in order; an empty plan means "none of ours here"."""

    family: Family
    table: Table
    chains: dict[str, tuple[PlannedRule, ...]] = field(default_factory=dict)

    @property
    def plan_hash(self) -> str:
        text = "\n".join(rule.line for rules in self.chains.values() for rule in rules)
        names = ",".join(self.chains)
        return _short_hash(f"{self.family}\0{self.table}\0{names}\0{text}")

    @property
    def jump(self) -> str | None:
        """The one rule we keep at position 1 of the built-in OUTPUT chain (its spec)."""
        if not self.chains:
            return None
        return f'-m comment --comment "egress plan={self.plan_hash}" -j {JUMP_CHAIN[self.table]}'

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values()) + (1 if self.chains else 0)


@dataclass(frozen=True, slots=True)
class FirewallPlan:
    tables: tuple[TablePlan, ...]
    warnings: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()  # the apps with a counting rule (confined apps)

    def table(self, family: Family, table: Table) -> TablePlan:
        return next(t for t in self.tables if t.family == family and t.table == table)


# --- building --------------------------------------------------------------------------------


def _uid_text(uids: UidRange) -> str:
    return str(uids)  # iptables-save prints "N" for N-N and "FIRST-LAST" otherwise


def _families_of(address: ListenAddress) -> tuple[Family, ...]:
    """The families a listener serves: ``[::]`` is dual-stack (the proxy binds it so)."""
    if address.host == "::":
        return ("ipv4", "ipv6")
    return ("ipv6",) if ":" in address.host else ("ipv4",)


def _listener_matches(address: ListenAddress, protocol: str = "tcp") -> str:
    """Matches for TCP (or UDP) to one proxy listener.

    A specific address matches by destination. An unspecified one (0.0.0.0 / ::) means "any
    local address": ``-m addrtype --dst-type LOCAL`` says exactly that (``-o lo`` would not: in
    OUTPUT the interface is the one routed to *before* a nat REDIRECT).
    """
    ip = ipaddress.ip_address(address.host)
    if ip.is_unspecified:
        return f"-p {protocol} -m {protocol} --dport {address.port} -m addrtype --dst-type LOCAL"
    prefix = 128 if ip.version == 6 else 32
    return f"-d {ip}/{prefix} -p {protocol} -m {protocol} --dport {address.port}"


def dns_mark(uids: UidRange) -> str:
    """The packet mark of an app range's DNS queries, as iptables-save prints it: the range's
    first uid (the listener maps it back to the app)."""
    return hex(uids.first)


def _overlaps(a: UidRange, b: UidRange) -> bool:
    return a.first <= b.last and b.first <= a.last


def _clip(uids: UidRange, ranges: Iterable[UidRange]) -> list[UidRange]:
    """The parts of ``uids`` inside the sandbox ``ranges`` (a uid outside is not confined)."""
    parts = []
    for sandbox in ranges:
        if _overlaps(uids, sandbox):
            parts.append(UidRange(max(uids.first, sandbox.first), min(uids.last, sandbox.last)))
    return sorted(parts)


def _merge(ranges: Iterable[UidRange]) -> list[UidRange]:
    merged: list[UidRange] = []
    for uids in sorted(ranges):
        if merged and uids.first <= merged[-1].last + 1:
            merged[-1] = UidRange(merged[-1].first, max(merged[-1].last, uids.last))
        else:
            merged.append(uids)
    return merged


_REDIRECTED_TO: Final = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _redirect_target(address: ListenAddress) -> str:
    """REDIRECT in OUTPUT rewrites the destination to the family's loopback address
    (127.0.0.1 / ::1), which a listener there or on the unspecified address receives; any other
    address (127.0.0.153 included: it is loopback, but not the one REDIRECT picks) needs DNAT."""
    ip = ipaddress.ip_address(address.host)
    if ip in _REDIRECTED_TO or ip.is_unspecified:
        return f"-j REDIRECT --to-ports {address.port}"
    return f"-j DNAT --to-destination {address}"


def build_plan(config: Config) -> FirewallPlan:
    """The desired rules for ``config``: filter (always) and nat (transparent mode), v4 and v6.

    Warnings (returned, not raised) name apps whose uids lie wholly or partly outside
    ``[firewall].sandbox_uids``: those uids are not confined by the firewall.
    """
    fw = config.firewall
    proxy = config.proxy
    warnings: list[str] = []
    sandbox = _merge(fw.sandbox_uids)

    app_ranges: list[tuple[str, UidRange]] = []
    for app in config.apps:
        confined: list[UidRange] = []
        for uids in app.uids:
            inside = _clip(uids, sandbox)
            confined.extend(inside)
            if sum(r.last - r.first + 1 for r in inside) != uids.last - uids.first + 1:
                warnings.append(
                    f"app {app.name!r}: uids {uids} are not (all) inside firewall.sandbox_uids;"
                    " traffic from the uids outside is not confined by the firewall"
                )
        app_ranges.extend((app.name, r) for r in _merge(confined))
    app_ranges.sort(key=lambda entry: entry[1])

    listeners = [*proxy.socks5_listen, *proxy.http_listen]
    transparent = proxy.transparent_listen if fw.mode is FirewallMode.TRANSPARENT else None
    if transparent is not None:
        listeners.append(transparent)
    dns = proxy.dns_listen if fw.mode is FirewallMode.TRANSPARENT else None
    if dns is not None:
        listeners.append(dns)
    listeners = list(dict.fromkeys(listeners))
    if dns is not None and transparent is not None:
        for other in (f for f in _families_of(transparent) if f not in _families_of(dns)):
            warnings.append(
                f"transparent mode: {other} DNS from sandbox uids is rejected, not answered"
                f" (proxy.dns_listen {dns} is {_families_of(dns)[0]} only)"
            )
    if fw.mode is FirewallMode.TRANSPARENT and transparent is not None:
        served = _families_of(transparent)
        for other in (f for f in FAMILIES if f not in served):
            warnings.append(
                f"transparent mode: {other} TCP from sandbox uids is rejected, not redirected"
                f" (proxy.transparent_listen {transparent} is {served[0]} only;"
                ' "[::]:PORT" serves both)'
            )

    tables: list[TablePlan] = []
    for family in FAMILIES:
        family_dns = dns if dns is not None and family in _families_of(dns) else None
        tables.append(_filter_plan(family, sandbox, listeners, app_ranges, family_dns))
        nat: dict[str, tuple[PlannedRule, ...]] = {}
        if transparent is not None and family in _families_of(transparent) and sandbox:
            nat = _nat_chains(family, sandbox, listeners, transparent, family_dns)
        tables.append(TablePlan(family, "nat", nat))
    return FirewallPlan(
        tables=tuple(tables),
        warnings=tuple(warnings),
        apps=tuple(dict.fromkeys(name for name, _ in app_ranges)),
    )


def _filter_plan(
    family: Family,
    sandbox: list[UidRange],
    listeners: list[ListenAddress],
    app_ranges: list[tuple[str, UidRange]],
    dns: ListenAddress | None = None,
) -> TablePlan:
    if not sandbox:
        return TablePlan(family, "filter", {})
    icmp = "icmp-admin-prohibited" if family == "ipv4" else "icmp6-adm-prohibited"
    output = tuple(
        PlannedRule(OUTPUT_CHAIN, f"-m owner --uid-owner {_uid_text(r)}", f"-j {SANDBOX_CHAIN}")
        for r in sandbox
    )
    accepts = [
        PlannedRule(SANDBOX_CHAIN, _listener_matches(a), "-j ACCEPT")
        for a in listeners
        if family in _families_of(a)
    ]
    if dns is not None:
        # Each app's datagrams to the DNS listener carry its first uid as their mark: a UDP
        # query says nothing of its sender, but the kernel's owner match does, and the
        # listener reads the mark (SO_RCVMARK). No app label: these count nothing.
        udp = _listener_matches(dns, "udp")
        accepts += [
            PlannedRule(
                SANDBOX_CHAIN,
                f"{udp} -m owner --uid-owner {_uid_text(r)}",
                f"-j MARK --set-xmark {dns_mark(r)}/0xffffffff",
            )
            for _, r in app_ranges
        ]
        accepts.append(PlannedRule(SANDBOX_CHAIN, udp, "-j ACCEPT"))
    counting = [
        PlannedRule(
            SANDBOX_CHAIN, f"-m owner --uid-owner {_uid_text(r)}", f"-j {REJECT_CHAIN}", app
        )
        for app, r in app_ranges
    ]
    catch_all = PlannedRule(SANDBOX_CHAIN, "", f"-j {REJECT_CHAIN}", UNASSIGNED_APP)
    reject = (
        PlannedRule(REJECT_CHAIN, "-p tcp", "-j REJECT --reject-with tcp-reset"),
        PlannedRule(REJECT_CHAIN, "", f"-j REJECT --reject-with {icmp}"),
    )
    return TablePlan(
        family,
        "filter",
        {
            OUTPUT_CHAIN: output,
            SANDBOX_CHAIN: (*accepts, *counting, catch_all),
            REJECT_CHAIN: reject,
        },
    )


def _nat_chains(
    family: Family,
    sandbox: list[UidRange],
    listeners: list[ListenAddress],
    transparent: ListenAddress,
    dns: ListenAddress | None = None,
) -> dict[str, tuple[PlannedRule, ...]]:
    nat = tuple(
        PlannedRule(NAT_CHAIN, f"-m owner --uid-owner {_uid_text(r)}", f"-j {NAT_SANDBOX_CHAIN}")
        for r in sandbox
    )
    returns = [
        PlannedRule(NAT_SANDBOX_CHAIN, _listener_matches(a), "-j RETURN")
        for a in listeners
        if family in _families_of(a) and a != transparent
    ]
    if dns is not None:  # the DNS listener's own TCP port is among the RETURNs above
        returns += [
            PlannedRule(
                NAT_SANDBOX_CHAIN, f"-p {protocol} -m {protocol} --dport 53", _redirect_target(dns)
            )
            for protocol in ("udp", "tcp")
        ]
    redirect = PlannedRule(NAT_SANDBOX_CHAIN, "-p tcp", _redirect_target(transparent))
    return {NAT_CHAIN: nat, NAT_SANDBOX_CHAIN: (*returns, redirect)}
