"""``egress rules ...`` as an operator runs it: a real process, a real config file (the file
store), a real DNS stub for ``check``; exit codes, output, the file after edits, the audit trail.

Each command is a child process (about half a second here), so tests group several commands;
the Redis tests at the end run against a real ``redis-server``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dnsstub import DnsStub
from tests.processes import run_egress
from tests.redisserver import RedisServer

API_ADDRESS = "93.184.215.14"  # what the stub says api.example.com is (public, not special)
PASSWORD_SHA256 = hashlib.sha256(b"s3cret").hexdigest()

CONFIG = """\
# egress config for the rules CLI tests: this comment must survive edits
[proxy]
socks5_listen = ["127.0.0.1:0"]

[resolver]
nameservers = ["{dns}"]
timeout = 1.0
attempts = 1

[log]
connection_log = "-"

# the blog
[[app]]
name = "blog"
uids = ["10001"]
allow = ["api.example.com:443", "*.example.org:80,443"]
limits = {{ connections_per_second = 20, burst = 40 }}
proxy_auth = {{ username = "blogger", password_sha256 = "{digest}" }}

[[app]]
name = "shop"
uids = ["10002-10009"]
allow = ["198.51.100.7:*"]
mode = "report"
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsStub]:
    with DnsStub({"api.example.com": [API_ADDRESS]}) as stub:
        yield stub


@pytest.fixture
def config(tmp_path: Path, dns: DnsStub) -> Path:
    path = tmp_path / "egress.toml"
    path.write_text(CONFIG.format(dns=dns.address, digest=PASSWORD_SHA256), encoding="utf-8")
    return path


def rules(config: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``egress rules COMMAND --config CONFIG ARGS...``, output captured, exit not checked."""
    return run_egress("rules", command, "--config", str(config), *args)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The error output of a command that had to fail with ``code`` (and print nothing)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("egress: "), result.stderr
    return result.stderr


def apps_in(config: Path) -> dict[str, dict[str, Any]]:
    """The ``[[app]]`` tables of the file as it is now, by name."""
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    return {app["name"]: app for app in data.get("app", [])}


OS_USER = pwd.getpwuid(os.getuid()).pw_name


def who() -> str:
    """How ``history`` names the user running these tests."""
    return f"{OS_USER} (cli on {socket.gethostname()})"


# --- reading ---------------------------------------------------------------------------------


def test_list_and_show_describe_every_app_without_the_password_hash(config: Path) -> None:
    listed = json.loads(ok(rules(config, "list", "--json")))
    assert listed["version"] == 0
    by_name = {app["name"]: app for app in listed["apps"]}
    assert by_name["blog"]["uids"] == ["10001"]
    assert by_name["blog"]["rules"] == 2
    assert by_name["blog"]["limits"] == {"connections_per_second": 20, "burst": 40}
    assert by_name["shop"] == {
        "name": "shop",
        "uids": ["10002-10009"],
        "mode": "report",
        "rules": 1,
        "limits": None,
        "etag": by_name["shop"]["etag"],
    }

    table = ok(rules(config, "list")).splitlines()
    assert table[0].split() == ["APP", "UIDS", "MODE", "RULES", "ETAG", "LIMITS"]
    blog_etag = by_name["blog"]["etag"]
    assert table[1].split() == [
        "blog",
        "10001",
        "enforce",
        "2",
        blog_etag,
        "connections_per_second=20",
        "burst=40",
    ]
    assert table[2].split()[:5] == ["shop", "10002-10009", "report", "1", by_name["shop"]["etag"]]
    assert table[-1] == f"2 apps; store version 0 ({config})"

    shown = ok(rules(config, "show", "blog"))
    lines = shown.splitlines()
    assert "uids:    10001" in lines
    assert "mode:    enforce" in lines
    assert "limits:  connections_per_second=20 burst=40" in lines
    assert "proxy_auth: username 'blogger'" in lines
    assert f"etag:    {blog_etag}" in lines
    rules_at = lines.index("rules (2):")
    assert lines[rules_at + 1 : rules_at + 3] == ["  api.example.com:443", "  *.example.org:80,443"]
    assert lines[-1] == f"store version 0 ({config})"
    assert PASSWORD_SHA256 not in shown


# --- edits -----------------------------------------------------------------------------------


def test_add_and_remove_edit_the_file_and_leave_an_audit_trail(config: Path) -> None:
    added = ok(rules(config, "add", "blog", "new.example.com:443", "[2001:db8::]/32:443"))
    assert added == "version 1: changed blog (+2 rules)\n"
    blog = apps_in(config)["blog"]
    assert blog["allow"] == [
        "api.example.com:443",
        "*.example.org:80,443",
        "new.example.com:443",
        "[2001:db8::]/32:443",
    ]
    assert config.read_text().startswith("# egress config for the rules CLI tests")

    removed = ok(rules(config, "remove", "blog", "*.example.org:80,443", "--revoke"))
    assert removed == "version 2: changed blog (-1 rules)\n"
    assert "*.example.org:80,443" not in apps_in(config)["blog"]["allow"]
    assert apps_in(config)["shop"]["allow"] == ["198.51.100.7:*"]  # the other app is untouched

    before = config.read_bytes()
    missing = fails(rules(config, "remove", "blog", "gone.example.com:443"), 4)
    assert "app 'blog' has no rule 'gone.example.com:443'" in missing
    assert config.read_bytes() == before

    history = ok(rules(config, "history")).splitlines()
    assert history[0].split()[:3] == ["VERSION", "TIME", "(UTC)"]
    assert [line.split()[0] for line in history[1:]] == ["2", "1"]  # newest first
    assert who() in history[1]
    assert history[1].endswith("changed blog (-1 rules) [revoke]")
    assert history[2].endswith("changed blog (+2 rules)")

    records = json.loads(ok(rules(config, "history", "blog", "--limit", "1", "--json")))
    [record] = records["records"]
    assert record["version"] == 2
    assert record["actor"] == {
        "name": OS_USER,
        "via": "cli",
        "host": socket.gethostname(),
    }
    assert record["revoke"] is True
    assert record["changes"][0]["rules_removed"] == ["*.example.org:80,443"]

    ok(run_egress("check-config", "--config", str(config)))


def test_set_creates_updates_and_delete_removes_an_app(config: Path) -> None:
    created = json.loads(
        ok(
            rules(
                config,
                "set",
                "api-worker",
                "--create",
                "--uids",
                "10050-10059,10070",
                "--mode",
                "report",
                "--limit",
                "burst=5",
                "--json",
            )
        )
    )
    assert created["version"] == 1
    assert created["summary"] == "created api-worker"
    assert apps_in(config)["api-worker"] == {
        "name": "api-worker",
        "uids": ["10050-10059", "10070"],
        "allow": [],
        "mode": "report",
        "limits": {"burst": 5},
    }

    etag = json.loads(ok(rules(config, "show", "blog", "--json")))["etag"]
    updated = ok(
        rules(
            config,
            "set",
            "blog",
            "--limit",
            "burst=none",
            "--limit",
            "max_concurrent=7",
            "--mode",
            "report",
            "--if-match",
            etag,
        )
    )
    assert updated == "version 2: changed blog (limits, mode)\n"
    blog = apps_in(config)["blog"]
    assert blog["limits"] == {"connections_per_second": 20, "max_concurrent": 7}
    assert blog["mode"] == "report"

    # The ETag read before the update no longer matches: the edit is refused, nothing changes.
    before = config.read_bytes()
    stale = fails(rules(config, "set", "blog", "--mode", "enforce", "--if-match", etag), 4)
    assert "app 'blog' changed since you read it" in stale
    assert config.read_bytes() == before

    assert (
        ok(rules(config, "delete", "api-worker", "--revoke")) == "version 3: deleted api-worker\n"
    )
    assert set(apps_in(config)) == {"blog", "shop"}
    ok(run_egress("check-config", "--config", str(config)))


def test_invalid_edits_change_nothing_and_say_what_is_wrong(config: Path) -> None:
    before = config.read_bytes()
    bad_rule = fails(rules(config, "add", "blog", "ok.example.com:443", "api.example.com"), 2)
    assert bad_rule == (
        "egress: 'api.example.com' has no port; expected HOST:PORTS such as 'api.example.com:443'\n"
    )
    unknown = fails(rules(config, "add", "nosuch", "ok.example.com:443"), 3)
    assert unknown.startswith("egress: no app named 'nosuch'")
    bad_limit = fails(rules(config, "set", "blog", "--limit", "burts=3"), 2)
    assert "--limit: got 'burts'" in bad_limit
    assert "did you mean 'burst'?" in bad_limit
    bad_value = fails(rules(config, "set", "blog", "--limit", "max_concurrent=many"), 2)
    assert "--limit max_concurrent: got 'many'; expected an integer from 1 to 1000000" in bad_value
    bad_uids = fails(rules(config, "set", "blog", "--uids", "10001,0"), 2)
    assert bad_uids == (
        "egress: command line: --uids: got '0'; expected uids other than 0"
        " (root is never sandboxed)\n"
    )
    overlap = fails(rules(config, "set", "blog", "--uids", "10005"), 2)
    assert "app 'blog'.uids[0]: got '10005'; expected uids no other app claims" in overlap
    assert "app 'shop'" in overlap
    exists = fails(rules(config, "set", "shop", "--create", "--uids", "10090"), 4)
    assert "app 'shop' exists already" in exists
    no_uids = fails(rules(config, "set", "fresh", "--create"), 2)
    assert "--uids" in no_uids

    assert config.read_bytes() == before
    assert ok(rules(config, "history")) == f"no audit records in {config}\n"


# --- check -----------------------------------------------------------------------------------


def test_check_resolves_with_the_configured_resolver_and_exits_0_or_1(
    config: Path, dns: DnsStub
) -> None:
    allowed = rules(config, "check", "blog", "api.example.com:443")
    assert allowed.returncode == 0, allowed.stderr
    lines = allowed.stdout.splitlines()
    assert lines[0] == "allowed: blog -> api.example.com:443"
    assert "  rule:      api.example.com:443" in lines
    assert f"  addresses: {API_ADDRESS}" in lines
    assert ("api.example.com", "A") in dns.queries  # the configured nameserver was asked

    wrong_port = rules(config, "check", "blog", "api.example.com:80", "--json")
    assert wrong_port.returncode == 1, wrong_port.stderr
    verdict = json.loads(wrong_port.stdout)
    assert verdict["allowed"] is False
    assert verdict["reason"] == "not_allowed"
    assert verdict["rule"] is None

    metadata = rules(config, "check", "blog", "169.254.169.254:80")
    assert metadata.returncode == 1, metadata.stderr
    assert metadata.stdout.splitlines()[:2] == [
        "denied: blog -> 169.254.169.254:80",
        "  reason:    special_address",
    ]
    assert "169.254.169.254 is link-local" in metadata.stdout

    bad = fails(rules(config, "check", "blog", "api.example.com"), 2)
    assert bad == "egress: 'api.example.com': write the destination as HOST:PORT\n"


# --- export and import -----------------------------------------------------------------------


def test_export_then_import_replaces_every_app_and_dry_run_changes_nothing(
    config: Path, tmp_path: Path
) -> None:
    exported = tomllib.loads(ok(rules(config, "export")))
    assert [app["name"] for app in exported["app"]] == ["blog", "shop"]
    assert exported["app"][0]["proxy_auth"]["password_sha256"] == PASSWORD_SHA256  # round-trips

    # The file to import: a whole config (its other sections are ignored) with the apps changed.
    wanted = tmp_path / "wanted.toml"
    wanted.write_text(
        "[proxy]\n"
        'socks5_listen = ["127.0.0.1:1"]\n\n'
        "[[app]]\n"
        'name = "blog"\n'
        'uids = ["10001"]\n'
        'allow = ["api.example.com:443", "cdn.example.net:443"]\n\n'
        "[[app]]\n"
        'name = "mail"\n'
        'uids = ["10020"]\n'
        'allow = ["smtp.example.com:587"]\n',
        encoding="utf-8",
    )
    before = config.read_bytes()
    dry = ok(rules(config, "import", str(wanted), "--dry-run")).splitlines()
    assert dry[0] == "dry run: the store is at version 0; this would:"
    assert dry[-1] == "nothing was changed (dry run)"
    assert "  change blog:" in dry
    assert "    + cdn.example.net:443" in dry
    assert "    - *.example.org:80,443" in dry
    assert "  create mail: uids 10020, mode enforce, 1 rule" in dry
    assert "  delete shop (it had 1 rule)" in dry
    assert config.read_bytes() == before

    stale = fails(rules(config, "import", str(wanted), "--if-version", "7"), 4)
    assert "the store is at version 0, not 7" in stale
    assert config.read_bytes() == before

    imported = ok(rules(config, "import", str(wanted), "--if-version", "0")).splitlines()
    assert imported[-1].startswith("version 1: changed blog")
    assert set(apps_in(config)) == {"blog", "mail"}
    assert apps_in(config)["blog"]["allow"] == ["api.example.com:443", "cdn.example.net:443"]
    ok(run_egress("check-config", "--config", str(config)))

    # JSON export to a file, imported back: nothing to change.
    out = tmp_path / "export.json"
    ok(rules(config, "export", "--format", "json", "--output", str(out)))
    assert [app["name"] for app in json.loads(out.read_text())["app"]] == ["blog", "mail"]
    assert ok(rules(config, "import", str(out))) == "no change; the store stays at version 1\n"


def test_a_malformed_import_is_refused_whole_with_every_problem_named(
    config: Path, tmp_path: Path
) -> None:
    before = config.read_bytes()
    broken = tmp_path / "broken.toml"
    broken.write_text('[[app]]\nname = "blog"\nuids = 10001"]\n', encoding="utf-8")
    syntax = fails(rules(config, "import", str(broken)), 2)
    assert syntax.startswith(f"egress: {broken}: line 3, column ")
    assert "got 'uids = 10001\"]'; expected valid TOML" in syntax

    invalid = tmp_path / "invalid.json"
    invalid.write_text(
        json.dumps(
            {
                "app": [
                    {"name": "blog", "uids": ["10001"], "allow": ["ok.example.com:443"]},
                    {"name": "mail", "uids": ["10001"], "allow": ["smtp.example.com"]},
                    {"name": "Bad Name", "uids": ["10030"], "alow": []},
                ]
            }
        ),
        encoding="utf-8",
    )
    problems = fails(rules(config, "import", str(invalid)), 2).splitlines()
    assert f"egress: {invalid}: app[1].allow[0]: got 'smtp.example.com'" in "\n".join(problems)
    keys = {line.removeprefix(f"egress: {invalid}: ").split(":")[0] for line in problems}
    assert {"app[1].allow[0]", "app[1].uids[0]", "app[2].name", "app[2].alow"} <= keys

    as_json = rules(config, "import", str(invalid), "--json")
    assert as_json.returncode == 2
    error = json.loads(as_json.stderr)
    assert error["error"] == "invalid"
    assert error["exit_code"] == 2
    assert {problem["file"] for problem in error["problems"]} == {str(invalid)}

    assert config.read_bytes() == before


# --- the Redis store -------------------------------------------------------------------------


@pytest.fixture
def redis_store(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test, stopped by pid when it ends."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def redis_config(tmp_path: Path, url: str, dns: DnsStub) -> Path:
    """A node's config with the rules in Redis: no [[app]] tables of its own."""
    path = tmp_path / "node.toml"
    path.write_text(
        "[proxy]\n"
        'socks5_listen = ["127.0.0.1:0"]\n\n'
        f'[resolver]\nnameservers = ["{dns.address}"]\n\n'
        '[rules]\nstore = "redis"\n\n'
        f'[redis]\nurl = "{url}"\n',
        encoding="utf-8",
    )
    return path


def test_import_seeds_a_redis_store_that_list_show_add_and_check_then_use(
    config: Path, tmp_path: Path, dns: DnsStub, redis_store: RedisServer
) -> None:
    node = redis_config(tmp_path, redis_store.url, dns)
    assert ok(rules(node, "list")) == f"0 apps; store version 0 ({redis_store.url})\n"

    # Seeding the store from a file-store config is an import of that file.
    seeded = ok(rules(node, "import", str(config))).splitlines()
    assert seeded[-1] == ("version 1: created blog (+2 rules); created shop (+1 rules)")
    listed = json.loads(ok(rules(node, "list", "--json")))
    assert listed["version"] == 1
    assert [app["name"] for app in listed["apps"]] == ["blog", "shop"]

    assert ok(rules(node, "add", "blog", "cdn.example.net:443")) == (
        "version 2: changed blog (+1 rules)\n"
    )
    shown = json.loads(ok(rules(node, "show", "blog", "--json")))
    assert shown["version"] == 2
    assert shown["app"]["allow"][-1] == "cdn.example.net:443"
    assert shown["app"]["proxy_auth"] == {"username": "blogger"}

    allowed = rules(node, "check", "blog", "api.example.com:443")
    assert allowed.returncode == 0, allowed.stderr

    history = json.loads(ok(rules(node, "history", "--json")))["records"]
    assert [record["version"] for record in history] == [2, 1]
    assert history[0]["actor"]["name"] == OS_USER


def test_redis_down_is_exit_5_naming_the_store(tmp_path: Path, dns: DnsStub) -> None:
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    node = redis_config(tmp_path, url, dns)
    down = fails(rules(node, "add", "blog", "cdn.example.net:443"), 5)
    assert f"rule store {url}: " in down
    assert "is Redis running" in down


def test_the_audit_trail_names_the_uid_not_what_the_environment_claims(config: Path) -> None:
    env = {**os.environ, "USER": "mallory", "LOGNAME": "mallory"}
    edited = run_egress(
        "rules", "add", "blog", "cdn.example.net:443", "--config", str(config), env=env
    )
    assert edited.returncode == 0, edited.stderr
    history = json.loads(ok(rules(config, "history", "--json")))["records"]
    assert history[0]["actor"]["name"] == OS_USER != "mallory"
