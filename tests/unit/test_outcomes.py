"""One outcome table: every outcome has one complete row, and nothing else maps outcomes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from egress.outcomes import OUTCOMES, DecisionLabel, Outcome
from rules.decide import Reason

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("outcome", list(Outcome), ids=str)
def test_every_outcome_has_a_complete_row(outcome: Outcome) -> None:
    row = OUTCOMES[outcome]
    assert row.detail and "\n" not in row.detail
    assert row.decision in (DecisionLabel.ALLOWED, DecisionLabel.DENIED, DecisionLabel.ERROR)
    # Either the outcome is answered on both protocols, or on neither (closed without a reply).
    assert (row.socks5 is None) == (row.http is None)
    if outcome is Outcome.ALLOWED:
        assert (row.socks5, row.http, row.proxy_status) == (0, 200, None)
    elif row.http is not None:
        assert row.socks5 is not None and 0 < row.socks5 <= 0x08
        assert 400 <= row.http < 600
        assert row.proxy_status is not None and re.fullmatch(r"[a-z_]+", row.proxy_status)
    else:
        assert row.proxy_status is None
    assert row.challenge is (row.http == 407)
    # A wait the limiter can name comes with Retry-After: a bucket's (429 rate_limited) or
    # the breaker's (503 limiter_unavailable); a full max_concurrent has no such time.
    assert row.retry_after is (outcome in (Outcome.RATE_LIMITED, Outcome.LIMITER_UNAVAILABLE))
    if row.retry_after:
        assert row.http in (429, 503)


def test_the_table_has_no_extra_rows() -> None:
    assert set(OUTCOMES) == set(Outcome)


def test_policy_reasons_are_outcomes() -> None:
    """rules/ cannot import egress; its reasons map to outcomes by value, not by a table."""
    for reason in Reason:
        assert Outcome(reason.value).value == reason.value


def test_extra_headers_come_from_the_row() -> None:
    assert OUTCOMES[Outcome.AUTH_FAILED].http_headers() == [
        ("Proxy-Authenticate", 'Basic realm="egress"')
    ]
    assert OUTCOMES[Outcome.RATE_LIMITED].http_headers(2.2) == [("Retry-After", "3")]
    assert OUTCOMES[Outcome.RATE_LIMITED].http_headers(0.01) == [("Retry-After", "1")]
    assert OUTCOMES[Outcome.NOT_ALLOWED].http_headers() == []


def test_outcomes_that_never_reached_a_decision_are_errors_not_denials() -> None:
    for outcome in (
        Outcome.BAD_REQUEST,
        Outcome.HANDSHAKE_TIMEOUT,
        Outcome.CLIENT_CLOSED,
        Outcome.DNS_FAILURE,
        Outcome.CONNECT_REFUSED,
    ):
        assert OUTCOMES[outcome].decision is DecisionLabel.ERROR


def test_the_readme_replies_table_matches() -> None:
    """The README's replies table lists every outcome with the codes the table says."""
    text = README.read_text()
    section = text[text.index("### Replies") :]
    section = section[: section.index("\n\n", section.index("| ---"))]
    listed: dict[str, str] = {}
    rows = [line for line in section.splitlines() if line.startswith("|")]
    for line in rows[2:]:  # after the header and the separator
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            listed[name] = line
    assert set(listed) == {o.value for o in Outcome}
    for outcome in Outcome:
        row = OUTCOMES[outcome]
        line = listed[outcome.value]
        if row.http is not None:
            assert str(row.http) in line, line
            assert f"0x{row.socks5:02X}" in line or f"0x{row.socks5:02x}" in line, line
        if row.proxy_status is not None:
            assert row.proxy_status in line, line
