"""The shipped monitoring: ``deploy/prometheus`` (recording and alerting rules, their promtool
unit tests, the scrape config they assume) and ``deploy/grafana/egress.json`` (the dashboard).

promtool (Debian's ``prometheus`` package) checks the rules and the scrape config, runs the
alerts' unit tests, and parses every dashboard query (through a throwaway rules file, so a typo
in a panel fails here). Then every metric name, label name and label value the rules and the
dashboard use is checked against what a live ``egress proxy`` (with Redis rate limits, a DNS
stub and real traffic: allowed, denied, rate-limited, unknown, shaped; a rejected reload; Redis
stopped) and a live ``egress firewall run`` in a network namespace (a blocked packet, a drift
repair, a rejected config) really export, scraped over HTTP: a name either exists there, under
the job the query names, or the test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from egress.outcomes import DecisionLabel, Outcome
from tests.configs import base_config, write_config
from tests.dnsstub import DnsStub
from tests.integration.test_ratelimit_redis import Node, running_nodes
from tests.netns import NetworkNamespace
from tests.processes import (
    REPO,
    read_line,
    start_firewall_controller,
    stop_process,
    wait_ready,
)
from tests.redisserver import RedisServer
from tests.support import APP_UID, OTHER_APP_UID, STRANGER_UID, run_as_uid, socket_as_uid

PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "egress.rules.yml"
RULES_TESTS = PROMETHEUS / "egress.rules.test.yml"
SCRAPE_EXAMPLE = PROMETHEUS / "scrape.example.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "egress.json"

PROXY_JOB, FIREWALL_JOB = "egress-proxy", "egress-firewall"

# Series Prometheus makes itself, and the labels it adds to every scraped one.
SYNTHETIC = {"up": {"job", "instance"}}
TARGET_LABELS = frozenset({"job", "instance"})

# Closed label vocabularies from the code, for values the live traffic here does not produce.
KNOWN_VALUES = {
    "reason": {str(outcome) for outcome in Outcome},
    "decision": {str(label) for label in DecisionLabel},
}

# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$app": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS...`` in deploy/prometheus (the files name each other relatively)."""
    executable = shutil.which("promtool")
    assert executable, "promtool is missing: scripts/test installs Debian's prometheus package"
    return subprocess.run(
        [executable, *args],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n" + (
        result.stdout + result.stderr
    )


# --- the files -------------------------------------------------------------------------------
def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know in {expr!r}"
    return expr


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard, named for the error messages: panel targets, and
    the selector inside each ``label_values(SELECTOR, LABEL)`` variable query."""
    queries = {}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            name = f"panel {panel['id']} {panel['title']!r} target {target['refId']}"
            queries[name] = grafana_to_promql(target["expr"])
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # the same question, as PromQL
            selector, label = label_values_query(variable)
            queries[f"variable {variable['name']!r}"] = f"group by ({label}) ({selector})"
    return queries


def label_values_query(variable: dict[str, Any]) -> tuple[str, str]:
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert match, f"variable {variable['name']!r}: not label_values(SELECTOR, LABEL): {query!r}"
    return match[1], match[2]


def rule_queries() -> dict[str, str]:
    return {rule.get("record") or rule["alert"]: rule["expr"] for rule in rules()}


# --- promtool --------------------------------------------------------------------------------
def test_rules_pass_promtool_check() -> None:
    assert_ok(promtool("check", "rules", RULES.name))


def test_the_scrape_example_is_a_valid_prometheus_config_loading_the_rules() -> None:
    result = promtool("check", "config", SCRAPE_EXAMPLE.name)
    assert_ok(result)
    assert RULES.name in result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(SCRAPE_EXAMPLE.read_text())["scrape_configs"]}
    assert jobs == {PROXY_JOB, FIREWALL_JOB}


def test_alert_unit_tests_pass() -> None:
    """The promtool unit tests make the key alerts provably fire, and stay quiet, on series
    shaped like the live ones."""
    assert_ok(promtool("test", "rules", RULES_TESTS.name))
    tested = set(re.findall(r"alertname: (\w+)", RULES_TESTS.read_text()))
    key_alerts = {
        "EgressProxyDown",
        "EgressProxyAbsent",
        "EgressBypassAttempts",
        "EgressRedisFallbackActive",
        "EgressFirewallDriftRepeated",
        "EgressConfigReloadFailed",
        "EgressRulePropagationSlow",
        "EgressFirewallControllerDown",
        "EgressFirewallSyncStale",
        "EgressFirewallSyncFailing",
        "EgressConnectionLogDropping",
        "EgressConnectionCapReached",
    }
    assert key_alerts <= tested, f"alerts without unit tests: {sorted(key_alerts - tested)}"
    assert tested <= set(alerts()), f"unit tests of unknown alerts: {tested - set(alerts())}"


def test_alerts_tell_on_call_what_to_do() -> None:
    for name, alert in alerts().items():
        assert alert.get("for"), f"{name}: no `for:`"
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        description = alert["annotations"]["description"]
        assert alert["annotations"]["summary"], name
        assert re.search(r"\b(egress_\w+|up\{job=)", description), f"{name}: names no metric"
        assert "First: " in description, f"{name}: no first thing to do"
        assert "`" in description or "/targets" in description, f"{name}: no command to run"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each panel query (Grafana variables substituted) goes through promtool as a recording
    rule of a throwaway rules file: promtool names the rule of a query that does not parse."""
    queries = dashboard_queries()
    names = {f"dashboard_query_{n}": query for n, query in enumerate(queries.values())}
    document = {"groups": [{"name": "dashboard", "rules": [
        {"record": name, "expr": query} for name, query in names.items()
    ]}]}  # fmt: skip
    check = tmp_path / "dashboard-queries.yml"
    check.write_text(yaml.safe_dump(document, width=1000))
    result = promtool("check", "rules", str(check))
    index = "\n".join(f"dashboard_query_{n}: {where}" for n, where in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nwhich are:\n{index}"


def test_the_dashboard_is_importable_and_covers_what_on_call_needs() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert label_values_query(variables["app"])[1] == "app"
    assert variables["app"]["includeAll"] and variables["app"]["multi"]
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"] == datasource for target in panel["targets"])
        assert panel.get("description"), f"{panel['title']}: say what it shows"
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert "Sandbox DNS (transparent mode)" in rows
    # The panels, each by the series it is drawn from (directly or through a rule).
    used = set()
    records = recording_rules()
    for query in dashboard_queries().values():
        for name in parse(query).metrics:
            used.add(name)
            used.update(parse(records[name]).metrics if name in records else ())
    wanted = {
        "egress_connections_total",  # by decision and reason per app
        "egress_open_tunnels",
        "egress_bytes_total",
        "egress_dns_seconds_bucket",
        "egress_upstream_connect_seconds_bucket",
        "egress_ratelimit_decisions_total",
        "egress_ratelimit_mode",  # Redis fallback mode
        "egress_rules_propagation_seconds_bucket",
        "egress_firewall_drift_repairs_total",
        "egress_firewall_blocked_packets",  # per app
        "egress_dns_listener_queries_total",
        "egress_dns_listener_query_seconds_bucket",
    }
    assert wanted <= used, f"no panel draws {sorted(wanted - used)}"


# --- PromQL, as far as names go --------------------------------------------------------------
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)
               (?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)  # numbers and durations (1h30m)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^@=<>(){}\[\],])
    """,
    re.VERBOSE,
)
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})


@dataclass
class Parsed:
    """What a query names: metrics with their label matchers, and grouping labels."""

    metrics: list[str] = field(default_factory=list)
    matchers: list[tuple[str, str, str, str]] = field(
        default_factory=list
    )  # metric, label, op, value
    grouping: set[str] = field(default_factory=set)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match, f"cannot read {expr[position:]!r} in {expr!r}"
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match[0]))
    return tokens


def _unquote(literal: str) -> str:
    return str(json.loads(literal)) if literal.startswith('"') else literal[1:-1]


def parse(expr: str) -> Parsed:
    """Metric names, matchers and grouping labels of a PromQL query (promtool checks the
    syntax; this only needs to tell names from functions, keywords, labels and durations)."""
    tokens, parsed, i = _tokens(expr), Parsed(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in _GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    parsed.grouping.add(tokens[i][1])
                i += 1
        elif kind == "ident" and (
            following == "(" or text in _AGGREGATIONS | _KEYWORDS | _GROUPING
        ):
            pass  # a function, an aggregation or a keyword
        elif kind == "ident" or text == "{":
            name = text if kind == "ident" else ""
            if kind == "ident":
                parsed.metrics.append(name)
                i += 1
            if i < len(tokens) and tokens[i][1] == "{":
                i += 1
                while tokens[i][1] != "}":
                    if tokens[i][1] == ",":
                        i += 1
                        continue
                    label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2][1]
                    parsed.matchers.append((name, label, op, _unquote(value)))
                    i += 3
            else:
                continue
        i += 1
    return parsed


def test_the_query_reader_tells_names_from_everything_else() -> None:
    parsed = parse(
        'histogram_quantile(0.99, sum by (instance, le) (rate(x_bucket{job="j",le=~"1"}[5m])))'
        ' > 1e3 or absent(up{job="j"}) unless y offset 30m and on(app) group_left z'
    )
    assert parsed.metrics == ["x_bucket", "up", "y", "z"]
    assert parsed.matchers == [
        ("x_bucket", "job", "=", "j"),
        ("x_bucket", "le", "=~", "1"),
        ("up", "job", "=", "j"),
    ]
    assert parsed.grouping == {"instance", "le", "app"}


# --- what live processes export --------------------------------------------------------------
@dataclass
class Exported:
    """Sample names of one job's scrape, with their label names and values."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = self.labels.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)


# The sandbox: an echo upstream the proxy may reach under a name the DNS stub resolves.
ECHO_NAME = "echo.monitoring.test"
ECHO = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(64)
    print(s.getsockname()[1], flush=True)
    print("ready", flush=True)
    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
    """
)
LIMITED_UID = OTHER_APP_UID  # one connection, then rate_limited (a Redis bucket)
SHAPED_BYTES = 96 * 1024  # over the blog app's 64 KiB/s burst: its reads are held
FIREWALL_METRICS = "127.0.0.1:19191"  # inside the controller's own namespace


@contextlib.contextmanager
def echo_upstream() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        port = int(read_line(proc, "echo upstream"))
        wait_ready(proc, "echo upstream")
        yield port
    finally:
        stop_process(proc)


def socks5(uid: int, proxy: tuple[str, int], host: str, port: int) -> tuple[int, socket.socket]:
    """A SOCKS5 CONNECT to ``host`` (by name) from a socket owned by ``uid``: the reply code
    (-1: refused at accept) and the socket, blocking, for the caller to use and close."""
    sock = socket_as_uid(uid)
    sock.setblocking(True)
    sock.settimeout(10)
    sock.connect(proxy)
    try:
        sock.sendall(b"\x05\x01\x00")
        if recv_exactly(sock, 2) != b"\x05\x00":
            return -1, sock
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        head = recv_exactly(sock, 4)
        recv_exactly(sock, {1: 4, 4: 16}[head[3]] + 2)
    except (ConnectionError, EOFError):
        return -1, sock
    return head[1], sock


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


def relay(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` through an open tunnel, half-close, read the echo to the end."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    echoed = b""
    while chunk := sock.recv(65536):
        echoed += chunk
    return echoed


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample ``name`` with ``labels`` (None: no such sample)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def proxy_config(
    path: Path,
    *,
    dns: str,
    redis_url: str,
    echo_port: int,
    also_allow: tuple[str, ...] = (),
    **extra: Any,
) -> Path:
    """The proxy's config; ``also_allow`` and ``extra`` land in the "limited" app's table."""
    echo = f"{ECHO_NAME}:{echo_port}"
    data = base_config(
        proxy={"dns_listen": "127.0.0.1:0"},
        resolver={"nameservers": [dns]},
        security={"allow_special": ["127.0.0.0/8"]},
        admin={"listen": "127.0.0.1:0"},
        ratelimit={"backend": "redis", "on_redis_error": "local", "redis_timeout": 0.5},
        redis={"url": redis_url},
        app=[
            {
                "name": "blog",
                "uids": [str(APP_UID)],
                "allow": [echo],
                "limits": {"bandwidth_bytes_per_second": 65536},
            },
            {
                "name": "limited",
                "uids": [str(LIMITED_UID)],
                "allow": [echo, *also_allow],
                "limits": {"connections_per_second": 0.001, "burst": 1},
                **extra,
            },
        ],
    )
    return write_config(path, data)


def scrape_live_proxy(directory: Path) -> str:
    with (
        RedisServer(directory / "redis") as redis_server,
        DnsStub({ECHO_NAME: ["127.0.0.1"]}) as dns,
        echo_upstream() as echo_port,
    ):
        config = directory / "proxy.toml"
        settings: dict[str, Any] = {
            "dns": dns.address,
            "redis_url": redis_server.url,
            "echo_port": echo_port,
        }
        proxy_config(config, **settings)
        with running_nodes(config) as (node,):
            exercise_proxy(node, echo_port)
            # A config the proxy must reject (the file store notices the edit by itself), then
            # a good one with a rule more: a rules update (the rules at start are not one).
            proxy_config(config, **settings, bogus_key=1)
            node.process.wait_for(
                lambda: sample(node.metrics(), "egress_config_reloads_total", result="error"),
                "the rejected reload counted",
            )
            proxy_config(config, **settings, also_allow=("api.monitoring.test:443",))
            node.process.wait_for(
                lambda: (
                    sample(node.metrics(), "egress_config_reloads_total", result="ok")
                    and sample(node.metrics(), "egress_rules_updates_total", result="ok")
                ),
                "the good reload and its rules update counted",
            )
            # Redis goes away: the limiter falls back and counts the failed round trips.
            redis_server.stop()
            node.process.wait_for(
                lambda: (
                    sample(node.metrics(), "egress_ratelimit_fallback_active") == 1
                    and sample(node.metrics(), "egress_ratelimit_redis_errors_total") is not None
                ),
                "the rate limiter's fallback and the Redis errors",
                timeout=15,
            )
            return node.metrics()


def exercise_proxy(node: Node, echo_port: int) -> None:
    proxy = node.address("socks5")
    code, tunnel = socks5(APP_UID, proxy, ECHO_NAME, echo_port)
    with tunnel:
        assert code == 0, code
        payload = bytes(range(256)) * (SHAPED_BYTES // 256)
        assert relay(tunnel, payload) == payload
    code, tunnel = socks5(APP_UID, proxy, "elsewhere.monitoring.test", 443)
    with tunnel:
        assert code == 2, f"not_allowed is SOCKS5 0x02, got {code}"
    for expected in (0, 2):  # the bucket holds one token
        code, tunnel = socks5(LIMITED_UID, proxy, ECHO_NAME, echo_port)
        with tunnel:
            assert code == expected, (code, expected)
    code, tunnel = socks5(STRANGER_UID, proxy, ECHO_NAME, echo_port)
    tunnel.close()
    assert code == -1, code
    # The sandbox DNS listener: the real dig as the app's uid, an answer and a denial.
    host, port = node.address("dns")
    for name, status in ((ECHO_NAME, "NOERROR"), ("elsewhere.monitoring.test", "NXDOMAIN")):
        dig = ["dig", f"@{host}", "-p", str(port), "+tries=1", "+time=3", name, "A"]
        asked = run_as_uid(APP_UID, dig)
        assert f"status: {status}" in asked.stdout, asked.stdout + asked.stderr

    def counted() -> bool:
        text = node.metrics()
        return (
            all(
                sample(text, "egress_connections_total", **labels) is not None
                for labels in (
                    {"app": "blog", "decision": "allowed"},
                    {"app": "blog", "reason": "not_allowed"},
                    {"app": "limited", "reason": "rate_limited"},
                    {"app": "_unknown", "reason": "unknown_client"},
                )
            )
            and bool(sample(text, "egress_bandwidth_shaped_seconds_total", app="blog"))
            and all(
                sample(text, "egress_dns_listener_queries_total", app="blog", answer=answer)
                for answer in ("answered", "denied")
            )
        )

    node.process.wait_for(counted, "every connection counted")


def firewall_config(path: Path, **extra: Any) -> Path:
    data = {
        "proxy": {"socks5_listen": ["127.0.0.1:1080"]},
        "firewall": {"sandbox_uids": ["10000-10999"], "interval": 0.3,
                     "metrics_listen": FIREWALL_METRICS},
        "app": [{"name": "blog", "uids": [str(APP_UID)], "allow": ["10.77.0.1:80"], **extra}],
    }  # fmt: skip
    return write_config(path, data)


def scrape_live_firewall(directory: Path) -> str:
    config = firewall_config(directory / "firewall.toml")
    with (
        NetworkNamespace(addresses=("10.77.0.1/32",)) as namespace,
        start_firewall_controller(config, netns=namespace) as controller,
    ):

        def scrape() -> str:
            with (
                namespace.entered(),
                urllib.request.urlopen(f"http://{FIREWALL_METRICS}/metrics", timeout=2) as reply,
            ):
                text: str = reply.read().decode()
                return text

        def seen(name: str, **labels: str) -> bool:
            return bool(sample(scrape(), name, **labels))

        controller.wait_for(
            lambda: seen("egress_firewall_sync_total", result="ok"),
            "first sync",
            ignoring=(OSError,),
        )
        # A bypass attempt: the app dials out past the proxy and is rejected.
        with namespace.entered():
            sock = socket_as_uid(APP_UID)
            sock.setblocking(True)
            sock.settimeout(2)
            with sock, pytest.raises(ConnectionRefusedError):
                sock.connect(("10.77.0.1", 80))
        controller.wait_for(
            lambda: seen("egress_firewall_blocked_packets", app="blog"), "the blocked packet"
        )
        # Drift: one of its rules deleted by hand is put back and counted.
        namespace.check(["iptables", "-D", "EGRESS-SANDBOX", "1"])
        controller.wait_for(lambda: seen("egress_firewall_drift_repairs_total"), "drift repaired")
        # A config it must reject.
        firewall_config(config, bogus=1)
        controller.wait_for(
            lambda: seen("egress_firewall_sync_total", result="config_error"), "config rejected"
        )
        return scrape()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Each job's live scrape (see the module docstring for what ran first)."""
    directory = tmp_path_factory.mktemp("monitoring")
    proxy, firewall = Exported(), Exported()
    proxy.add(scrape_live_proxy(directory))
    firewall.add(scrape_live_firewall(directory))
    return {PROXY_JOB: proxy, FIREWALL_JOB: firewall}


def every_query() -> dict[str, str]:
    return {**{f"rule {k}": v for k, v in rule_queries().items()}, **dashboard_queries()}


def output_labels(record_expr: str) -> set[str]:
    """The labels a recording rule's series carry: its outermost ``by (...)`` (``le`` is
    consumed by histogram_quantile)."""
    match = re.search(r"\bby \(([^)]*)\)", record_expr)
    assert match, f"recording rules here aggregate with an explicit by (...): {record_expr}"
    return {label.strip() for label in match[1].split(",")} - {"le"}


class Catalog:
    """Where every name a query may use comes from, with its labels and their values."""

    def __init__(self, exported: dict[str, Exported]) -> None:
        self.exported = exported
        self.records = recording_rules()

    def jobs_of(self, metric: str) -> set[str]:
        return {job for job, names in self.exported.items() if metric in names.labels}

    def labels(self, metric: str, job: str | None = None) -> dict[str, set[str]]:
        """Label name -> the values seen live, for a name this catalog knows.

        A scraped series also carries ``job`` and ``instance``; a recording rule's carries
        only what it aggregates by."""
        if metric in SYNTHETIC:
            return {label: set() for label in SYNTHETIC[metric]}
        if metric in self.records:
            merged: dict[str, set[str]] = {}
            for source in parse(self.records[metric]).metrics:
                for label, values in self.labels(source).items():
                    merged.setdefault(label, set()).update(values)
            wanted = output_labels(self.records[metric])
            return {label: merged.get(label, set()) for label in wanted}
        merged = {label: set() for label in TARGET_LABELS}
        for name in [job] if job else sorted(self.jobs_of(metric)):
            for label, values in self.exported[name].labels.get(metric, {}).items():
                merged.setdefault(label, set()).update(values)
        return merged


def problems_of(where: str, query: str, catalog: Catalog) -> Iterator[str]:
    """What is wrong with the names in ``query``, judged by the live scrapes."""
    parsed = parse(query)
    available: set[str] = set()  # labels the query's series carry, for its by (...) / on (...)
    for metric in parsed.metrics:
        matchers = [(label, op, value) for name, label, op, value in parsed.matchers
                    if name == metric]  # fmt: skip
        job = next((value for label, op, value in matchers if label == "job" and op == "="), None)
        raw = metric not in catalog.records and metric not in SYNTHETIC
        if raw and job is None:
            yield f"{where}: {metric} is selected without job=..."
            continue
        if job is not None and job not in catalog.exported:
            yield f"{where}: job={job!r} is no job of scrape.example.yml"
            continue
        if raw and job is not None and metric not in catalog.exported[job].labels:
            elsewhere = catalog.jobs_of(metric)
            yield f"{where}: {metric} is not exported by job={job!r}" + (
                f" (it is by {sorted(elsewhere)})" if elsewhere else ""
            )
            continue
        labels = catalog.labels(metric, job)
        available.update(labels)
        for label, op, value in matchers:
            if label not in labels:
                yield f"{where}: {metric} has no label {label!r} (it has {sorted(labels)})"
                continue
            if label in TARGET_LABELS or metric in SYNTHETIC:
                continue  # job is checked above; instance values are the site's
            literal = value.split("|") if op in ("=~", "!~") else [value]
            if op in ("=~", "!~") and not all(re.fullmatch(r"[\w.]+", v) for v in literal):
                continue  # a real pattern (".*" for all apps): nothing to compare
            values = labels[label] | KNOWN_VALUES.get(label, set())
            for one in literal:
                if one not in values:
                    selector = f"{metric}{{{label}{op}{value!r}}}"
                    yield f"{where}: {selector}: {one!r} never seen ({sorted(values)})"
    for label in parsed.grouping - available:
        yield f"{where}: groups by {label!r}, which none of {parsed.metrics} carries"


@pytest.mark.netns
def test_every_name_the_rules_and_dashboard_use_is_exported_live(
    exported: dict[str, Exported],
) -> None:
    catalog = Catalog(exported)
    problems = [
        problem
        for where, query in every_query().items()
        for problem in problems_of(where, query, catalog)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.netns
def test_the_live_checks_see_what_the_alerts_need(exported: dict[str, Exported]) -> None:
    """The traffic above made the labelled series appear (else the name check proves little)."""
    proxy = exported[PROXY_JOB].labels
    assert {"allowed", "denied"} <= proxy["egress_connections_total"]["decision"]
    assert {"rate_limited", "not_allowed", "unknown_client"} <= proxy["egress_connections_total"][
        "reason"
    ]
    assert {"allowed", "limited"} <= proxy["egress_ratelimit_decisions_total"]["result"]
    assert {"ok", "error"} <= proxy["egress_config_reloads_total"]["result"]
    firewall = exported[FIREWALL_JOB].labels
    assert "blog" in firewall["egress_firewall_blocked_packets"]["app"]
    assert {"ok", "config_error"} <= firewall["egress_firewall_sync_total"]["result"]
