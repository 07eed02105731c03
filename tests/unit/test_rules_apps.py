"""One app model: every way of building a rule set checks it, with the reader's own words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from egress.config import load_config
from egress.errors import ConfigError
from rules.apps import App, Limits, ProxyAuth, RuleSet, UidRange
from rules.parse import parse_rule
from rules.problems import InvalidRuleSetError

BAD_APPS: dict[str, list[dict[str, Any]]] = {
    "bad name": [{"name": "Blog!", "uids": ["10001"]}],
    "root uid": [{"name": "a", "uids": ["0"]}],
    "no uids": [{"name": "a", "uids": []}],
    "bad rule": [{"name": "a", "uids": ["10001"], "allow": ["127.1:80"]}],
    "bad limit": [{"name": "a", "uids": ["10001"], "limits": {"burst": 0}}],
    "misspelt key": [{"name": "a", "uids": ["10001"], "alow": []}],
    "misspelt limit": [{"name": "a", "uids": ["10001"], "limits": {"brust": 3}}],
    "duplicate name": [{"name": "a", "uids": ["10001"]}, {"name": "a", "uids": ["10002"]}],
    "overlap": [{"name": "a", "uids": ["10001-10009"]}, {"name": "b", "uids": ["10009"]}],
    "bad mode": [{"name": "a", "uids": ["10001"], "mode": "Report"}],
    "bad auth": [{"name": "a", "uids": ["10001"], "proxy_auth": {"username": "a"}}],
}


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def _as_toml(apps: list[dict[str, Any]]) -> str:
    text = '[proxy]\nsocks5_listen = ["127.0.0.1:0"]\n'
    for app in apps:
        text += "[[app]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in app.items())
    return text


@pytest.mark.parametrize("case", list(BAD_APPS), ids=str)
def test_from_data_reports_exactly_what_the_file_reader_reports(tmp_path: Path, case: str) -> None:
    """A store or an API validating an edit says what `check-config` says about the file."""
    apps = BAD_APPS[case]
    path = tmp_path / "egress.toml"
    path.write_text(_as_toml(apps))
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    with pytest.raises(InvalidRuleSetError) as from_data:
        RuleSet.from_data({"app": apps}, version=1, source=str(path))
    assert from_data.value.problems == from_file.value.problems
    assert from_data.value.problems  # and there is something to say


def test_the_typed_constructors_check_too() -> None:
    rule = parse_rule("api.example.com:443")
    with pytest.raises(InvalidRuleSetError) as bad_name:
        App("Blog!", (UidRange(10001, 10001),))
    (problem,) = bad_name.value.problems
    assert problem.key == "name"
    assert "a-z, 0-9" in problem.expected
    with pytest.raises(InvalidRuleSetError) as root:
        App("a", (UidRange(0, 5),))
    assert root.value.problems[0].hint == "root is never sandboxed"
    with pytest.raises(InvalidRuleSetError) as not_a_rule:
        App("a", (UidRange(10001, 10001),), ("api.example.com:443",))  # type: ignore[arg-type]
    assert not_a_rule.value.problems[0].key == "allow[0]"
    with pytest.raises(InvalidRuleSetError) as overlap:
        RuleSet((App("a", (UidRange(10, 20),), (rule,)), App("b", (UidRange(20, 30),))))
    (problem,) = overlap.value.problems
    assert problem.key == "app[1].uids[0]"
    assert "app 'b' overlaps app 'a' at app[0].uids[0] = '10-20'" in (problem.hint or "")
    with pytest.raises(InvalidRuleSetError) as duplicate:
        RuleSet((App("a", (UidRange(10, 20),)), App("a", (UidRange(30, 40),))))
    assert duplicate.value.problems[0].key == "app[1].name"
    with pytest.raises(InvalidRuleSetError):
        RuleSet((), version=-1)
    with pytest.raises(ValueError, match="burst"):
        Limits(burst=0)
    with pytest.raises(ValueError, match="proxy_auth"):
        ProxyAuth("a:b", "0" * 64)
    with pytest.raises(ValueError):
        UidRange(5, 4)


def test_a_valid_set_round_trips_and_indexes_uids() -> None:
    ruleset = RuleSet.from_data(
        {
            "app": [
                {"name": "a", "uids": ["10001", "10010-10019"], "allow": ["api.example.com:443"]},
                {"name": "b", "uids": [10002], "mode": "report", "limits": {"burst": 3}},
            ]
        },
        version=7,
        source="redis",
    )
    assert ruleset.version == 7
    assert [app.name for app in ruleset.apps] == ["a", "b"]
    assert ruleset.app_for_uid(10015) is ruleset.apps[0]
    assert ruleset.app_for_uid(10002) is ruleset.apps[1]
    assert ruleset.app_for_uid(10003) is None
    assert ruleset.apps[1].limits == Limits(burst=3)
    # The same apps make an equal set (stores compare versions, not identity).
    assert RuleSet(ruleset.apps, 7) == ruleset
