"""The admin API over real HTTP, as an operator's client meets it: tokens, bad input, conflicts
between editors, imports, the audit trail, checks through a real resolver, metrics.

Each test gets a live admin listener (a real aiohttp runner on a loopback port, in its own
thread) over a fresh memory store seeded with ``blog`` and ``shop`` (tests/adminserver.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests

from tests.adminserver import READ_TOKEN, WRITE_TOKEN, AdminServer
from tests.dnsstub import DnsStub

WRITE = AdminServer.auth(WRITE_TOKEN)
READ = AdminServer.auth(READ_TOKEN)
TIMEOUT = 10
PUBLIC_ADDRESS = "93.184.215.14"  # not special-purpose: a rule can allow it


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    with DnsStub(
        {
            "api.example.com": [PUBLIC_ADDRESS],
            "cdn.example.org": [PUBLIC_ADDRESS],
            "internal.example.org": ["127.0.0.1"],
        }
    ) as stub:
        yield stub


@pytest.fixture
def server(dns: DnsStub) -> Iterator[AdminServer]:
    with AdminServer(nameserver=dns.address) as admin:
        yield admin


def call(
    server: AdminServer,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    return requests.request(
        method, server.url + path, headers=WRITE if headers is None else headers,
        timeout=TIMEOUT, **kwargs,
    )  # fmt: skip


def error_of(response: requests.Response) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == response.status_code
    return dict(body["error"])


def store_version(server: AdminServer) -> int:
    assert server.store is not None
    return int(server.call(server.store.version))


def stored_app(server: AdminServer, name: str) -> Any:
    assert server.store is not None
    store = server.store

    async def read() -> Any:
        return (await store.read()).app(name)

    return server.call(read)


# --- tokens --------------------------------------------------------------------------------


def test_a_request_without_a_token_is_refused_with_a_bearer_challenge(
    server: AdminServer,
) -> None:
    response = call(server, "GET", "/v1/apps", headers={})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(response)["code"] == "missing_token"


@pytest.mark.parametrize(
    "authorization",
    ["Bearer not-the-token", "Bearer " + WRITE_TOKEN + "x", "Basic " + WRITE_TOKEN, "Bearer"],
)
def test_a_wrong_token_is_refused(server: AdminServer, authorization: str) -> None:
    response = call(server, "GET", "/v1/apps", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(response)["code"] in {"bad_token", "missing_token"}


def test_the_scheme_name_is_case_insensitive(server: AdminServer) -> None:
    response = call(server, "GET", "/v1/apps", headers={"Authorization": f"bearer {READ_TOKEN}"})
    assert response.status_code == 200


def test_a_read_token_reads_but_cannot_write(server: AdminServer) -> None:
    assert call(server, "GET", "/v1/apps/blog", headers=READ).status_code == 200
    before = store_version(server)
    for method, path, body in [
        ("PATCH", "/v1/apps/blog", {"add_rules": ["x.example.com:443"]}),
        ("PUT", "/v1/apps/blog", {"uids": ["10001"]}),
        ("DELETE", "/v1/apps/blog", None),
        ("POST", "/v1/import", {"app": []}),
    ]:
        response = call(server, method, path, headers=READ, json=body)
        assert response.status_code == 403, (method, path)
        error = error_of(response)
        assert error["code"] == "read_only_token"
        assert "'viewer'" in error["message"] and "write" in error["message"]
    assert store_version(server) == before


def test_with_no_token_configured_the_api_serves_nobody(dns: DnsStub) -> None:
    with AdminServer(tokens=()) as server:
        for method, path in [("GET", "/v1/apps"), ("PATCH", "/v1/apps/blog")]:
            response = call(server, method, path, headers={}, json={})
            assert response.status_code == 403
            error = error_of(response)
            assert error["code"] == "no_tokens_configured"
            assert "[admin].tokens" in error["message"]
        assert call(server, "GET", "/v1/openapi.json", headers={}).status_code == 200
        assert call(server, "GET", "/metrics", headers={}).status_code == 200
        assert call(server, "GET", "/healthz", headers={}).status_code == 200


# --- bad requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"add_rules": [', "not JSON"),
        (b'{"mode": "report", "mode": "enforce"}', "twice"),
        (b'{"limits": {"burst": NaN}}', "NaN"),
        (b"\xff\xfe", "UTF-8"),
        (b"   ", "no body"),
        (b"[" * 20_000 + b"]" * 20_000, "deeply"),
    ],
)
def test_a_body_that_is_not_json_is_a_400(server: AdminServer, body: bytes, words: str) -> None:
    response = call(
        server,
        "PATCH",
        "/v1/apps/blog",
        data=body,
        headers={**WRITE, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "bad_json"
    assert words in error["message"]


def test_a_body_that_is_not_an_object_is_a_400(server: AdminServer) -> None:
    response = call(server, "PATCH", "/v1/apps/blog", json=["add_rules"])
    assert response.status_code == 400
    assert error_of(response)["problems"][0]["expected"].startswith("an object")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_a_415(server: AdminServer, content_type: str | None) -> None:
    headers = dict(WRITE)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = call(server, "PUT", "/v1/apps/blog", data=b'{"uids": ["10001"]}', headers=headers)
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_json_with_a_charset_other_than_utf8_is_a_415(server: AdminServer) -> None:
    headers = {**WRITE, "Content-Type": "application/json; charset=latin-1"}
    response = call(server, "PUT", "/v1/apps/blog", data=b'{"uids": ["10001"]}', headers=headers)
    assert response.status_code == 415


def test_an_oversized_body_is_a_413_in_our_json(server: AdminServer) -> None:
    big = json.dumps({"app": [], "pad": "x" * (server.max_body_bytes + 1000)}).encode()
    headers = {**WRITE, "Content-Type": "application/json"}
    response = call(server, "POST", "/v1/import", data=big, headers=headers)
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "body_too_large"
    assert str(server.max_body_bytes) in error["message"]


def test_an_oversized_chunked_body_is_a_413_in_our_json(server: AdminServer) -> None:
    """No Content-Length: aiohttp's client_max_size stops the read; the answer is still ours."""
    chunk = b" " * 8192
    count = server.max_body_bytes // len(chunk) + 4
    headers = {**WRITE, "Content-Type": "application/json"}
    response = call(
        server, "POST", "/v1/import", data=iter([b'{"app": []'] + [chunk] * count + [b"}"]),
        headers=headers,
    )  # fmt: skip
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert store_version(server) == 0


def test_an_invalid_edit_lists_every_problem_and_changes_nothing(server: AdminServer) -> None:
    response = call(
        server,
        "PATCH",
        "/v1/apps/blog",
        json={
            "add_rules": ["api.example.com", "*.example.com:99999", "ok.example.com:443"],
            "uids": ["0", "10010"],
            "mode": "enforcing",
            "limits": {"burst": 0, "brust": 3},
            "colour": "blue",
        },
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid"
    problems = {problem["key"]: problem for problem in error["problems"]}
    assert set(problems) >= {
        "add_rules[0]",
        "add_rules[1]",
        "uids[0]",
        "mode",
        "limits.burst",
        "limits.brust",
        "colour",
    }, problems
    assert problems["mode"]["hint"] == "did you mean 'enforce'?"
    assert problems["limits.brust"]["hint"] == "did you mean 'burst'?"
    assert problems["uids[0]"]["expected"] == "uids other than 0"
    for problem in error["problems"]:
        assert set(problem) == {"key", "value", "expected", "hint"}
    assert store_version(server) == 0


def test_uids_claimed_by_another_app_are_a_400_naming_both(server: AdminServer) -> None:
    response = call(server, "PATCH", "/v1/apps/blog", json={"uids": ["10015"]})
    assert response.status_code == 400
    text = json.dumps(error_of(response)["problems"])
    assert "blog" in text and "shop" in text


def test_put_refuses_a_body_naming_another_app(server: AdminServer) -> None:
    response = call(server, "PUT", "/v1/apps/blog", json={"name": "shop", "uids": ["10001"]})
    assert response.status_code == 400
    (problem,) = error_of(response)["problems"]
    assert problem["key"] == "name"
    assert "'blog'" in problem["expected"]


def test_a_misspelt_query_parameter_is_a_400_not_a_real_import(server: AdminServer) -> None:
    response = call(server, "POST", "/v1/import?dryrun=true", json={"app": []})
    assert response.status_code == 400
    (problem,) = error_of(response)["problems"]
    assert problem["hint"] == "did you mean 'dry_run'?"
    assert store_version(server) == 0


def test_unknown_apps_and_routes_are_404_and_methods_405(server: AdminServer) -> None:
    for method, path, body in [
        ("GET", "/v1/apps/nosuch", None),
        ("PATCH", "/v1/apps/nosuch", {"mode": "report"}),
        ("DELETE", "/v1/apps/nosuch", None),
        ("GET", "/v1/apps/nosuch/check?destination=api.example.com:443", None),
    ]:
        response = call(server, method, path, json=body)
        assert response.status_code == 404, (method, path)
        error = error_of(response)
        assert error["code"] == "unknown_app"
        assert "'nosuch'" in error["message"]
    response = call(server, "GET", "/v1/nothing")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    response = call(server, "POST", "/v1/apps")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET"
    assert error_of(response)["code"] == "method_not_allowed"


# --- reads -------------------------------------------------------------------------------------


def test_list_and_get_show_apps_with_etags_but_never_a_password_hash(
    server: AdminServer,
) -> None:
    listing = call(server, "GET", "/v1/apps", headers=READ)
    assert listing.status_code == 200
    body = listing.json()
    assert body["version"] == 0
    summary = {app["name"]: app for app in body["apps"]}
    assert summary["blog"]["rules"] == 2
    assert summary["blog"]["limits"] == {"connections_per_second": 20.0, "burst": 40}
    assert summary["shop"]["limits"] is None
    shop = call(server, "GET", "/v1/apps/shop", headers=READ)
    assert shop.headers["ETag"] == f'"{summary["shop"]["etag"]}"'
    assert shop.headers["X-Egress-Version"] == "0"
    assert shop.json()["app"]["proxy_auth"] == {"username": "shop"}
    for path in ["/v1/apps", "/v1/apps/shop", "/v1/export", "/v1/history"]:
        assert "ab" * 32 not in call(server, "GET", path).text, path


def test_put_without_the_password_keeps_the_stored_one(server: AdminServer) -> None:
    shop = call(server, "GET", "/v1/apps/shop").json()["app"]
    shop["allow"].append("198.51.100.7:443")
    response = call(server, "PUT", "/v1/apps/shop", json=shop)
    assert response.status_code == 200, response.text
    stored = stored_app(server, "shop")
    assert stored.proxy_auth.password_sha256 == "ab" * 32
    assert [rule.text for rule in stored.allow][-1] == "198.51.100.7:443"
    response = call(
        server, "PUT", "/v1/apps/blog", json={"uids": ["10001"], "proxy_auth": {"username": "b"}}
    )
    assert response.status_code == 400
    (problem,) = error_of(response)["problems"]
    assert problem["key"] == "proxy_auth.password_sha256"


def test_put_creates_with_201_and_if_none_match_refuses_an_existing_app(
    server: AdminServer,
) -> None:
    created = call(server, "PUT", "/v1/apps/wiki", json={"uids": ["20000-20009"]})
    assert created.status_code == 201
    assert created.json()["version"] == 1
    assert created.headers["X-Egress-Version"] == "1"
    again = call(
        server,
        "PUT",
        "/v1/apps/wiki",
        json={"uids": ["20000-20009"]},
        headers={**WRITE, "If-None-Match": "*"},
    )
    assert again.status_code == 409
    assert error_of(again)["etag"] == created.json()["etag"]


def test_patch_merges_limits_and_null_clears(server: AdminServer) -> None:
    response = call(
        server, "PATCH", "/v1/apps/blog", json={"limits": {"burst": None, "max_concurrent": 5}}
    )
    assert response.json()["app"]["limits"] == {"connections_per_second": 20.0, "max_concurrent": 5}
    response = call(server, "PATCH", "/v1/apps/blog", json={"limits": None})
    assert "limits" not in response.json()["app"]


def test_removing_a_rule_the_app_does_not_have_is_a_409(server: AdminServer) -> None:
    response = call(server, "PATCH", "/v1/apps/blog", json={"remove_rules": ["x.example.com:1"]})
    assert response.status_code == 409
    error = error_of(response)
    assert "x.example.com:1" in error["message"]
    assert error["etag"] == call(server, "GET", "/v1/apps/blog").json()["etag"]


def test_delete_with_revoke_is_204_and_audited_as_a_revoke(server: AdminServer) -> None:
    response = call(server, "DELETE", "/v1/apps/shop?revoke=true")
    assert response.status_code == 204
    assert response.headers["X-Egress-Version"] == "1"
    assert call(server, "GET", "/v1/apps/shop").status_code == 404
    (record,) = call(server, "GET", "/v1/history?app=shop").json()["records"]
    assert record["revoke"] is True
    assert record["changes"][0]["action"] == "deleted"


# --- concurrent editors ------------------------------------------------------------------------


def test_if_match_with_a_stale_etag_is_a_409_carrying_the_current_one(server: AdminServer) -> None:
    stale = call(server, "GET", "/v1/apps/blog").headers["ETag"]
    fresh = call(server, "PATCH", "/v1/apps/blog", json={"mode": "report"}).headers["ETag"]
    response = call(
        server, "PATCH", "/v1/apps/blog", json={"mode": "enforce"},
        headers={**WRITE, "If-Match": stale},
    )  # fmt: skip
    assert response.status_code == 409
    assert response.headers["ETag"] == fresh
    assert f'"{error_of(response)["etag"]}"' == fresh
    assert stored_app(server, "blog").mode.value == "report"


def test_two_editors_with_if_match_one_wins_the_other_redoes(server: AdminServer) -> None:
    tag = call(server, "GET", "/v1/apps/blog").headers["ETag"]
    alice = call(
        server, "PATCH", "/v1/apps/blog", json={"add_rules": ["a.example.com:443"]},
        headers={**WRITE, "If-Match": tag},
    )  # fmt: skip
    bob = call(
        server, "PATCH", "/v1/apps/blog", json={"add_rules": ["b.example.com:443"]},
        headers={**WRITE, "If-Match": tag},
    )  # fmt: skip
    assert alice.status_code == 200
    assert bob.status_code == 409
    current = error_of(bob)["etag"]
    assert current == alice.json()["etag"]
    bob = call(
        server, "PATCH", "/v1/apps/blog", json={"add_rules": ["b.example.com:443"]},
        headers={**WRITE, "If-Match": f'"{current}"'},
    )  # fmt: skip
    assert bob.status_code == 200
    assert bob.json()["app"]["allow"][-2:] == ["a.example.com:443", "b.example.com:443"]


def test_concurrent_editors_without_if_match_lose_nothing(server: AdminServer) -> None:
    editors = 12

    async def edit_all() -> list[int]:
        async with aiohttp.ClientSession(headers=WRITE) as session:

            async def add(index: int) -> int:
                async with session.patch(
                    f"{server.url}/v1/apps/blog",
                    json={"add_rules": [f"e{index}.example.com:443"]},
                ) as response:
                    return response.status

            return list(await asyncio.gather(*(add(index) for index in range(editors))))

    assert asyncio.run(asyncio.wait_for(edit_all(), 30)) == [200] * editors
    allow = call(server, "GET", "/v1/apps/blog").json()["app"]["allow"]
    assert {f"e{index}.example.com:443" for index in range(editors)} <= set(allow)
    assert store_version(server) == editors


# --- import and export -------------------------------------------------------------------------


def test_dry_run_import_shows_the_diff_and_changes_nothing(server: AdminServer) -> None:
    exported = call(server, "GET", "/v1/export").json()
    exported["app"] = [app for app in exported["app"] if app["name"] != "shop"]
    exported["app"][0]["allow"].append("new.example.com:443")
    response = call(server, "POST", "/v1/import?dry_run=true", json=exported)
    assert response.status_code == 200
    result = response.json()
    assert result["dry_run"] is True
    assert result["version"] == 0
    changes = {change["app"]: change for change in result["changes"]}
    assert changes["shop"]["action"] == "deleted"
    assert changes["blog"]["rules_added"] == ["new.example.com:443"]
    assert store_version(server) == 0
    assert call(server, "GET", "/v1/apps/shop").status_code == 200


def test_import_is_all_or_nothing_and_if_match_is_the_store_version(server: AdminServer) -> None:
    export = call(server, "GET", "/v1/export")
    assert export.headers["ETag"] == '"0"'
    body = export.json()
    broken = {"app": [*body["app"], {"name": "bad", "uids": ["10001"], "allow": ["nope"]}]}
    response = call(server, "POST", "/v1/import", json=broken)
    assert response.status_code == 400
    keys = {problem["key"] for problem in error_of(response)["problems"]}
    assert {"app[2].allow[0]", "app[2].uids[0]"} <= keys
    assert store_version(server) == 0
    call(server, "PATCH", "/v1/apps/blog", json={"mode": "report"})  # someone else: version 1
    response = call(server, "POST", "/v1/import", json=body, headers={**WRITE, "If-Match": '"0"'})
    assert response.status_code == 409
    assert error_of(response)["version"] == 1
    response = call(server, "POST", "/v1/import", json=body, headers={**WRITE, "If-Match": '"1"'})
    assert response.status_code == 200
    assert response.json()["version"] == 2
    # the export round-trips: shop keeps its password although the export never showed it
    assert stored_app(server, "shop").proxy_auth.password_sha256 == "ab" * 32
    assert stored_app(server, "blog").mode.value == "enforce"


def test_an_import_must_say_app(server: AdminServer) -> None:
    response = call(server, "POST", "/v1/import", json={})
    assert response.status_code == 400
    assert error_of(response)["problems"][0]["key"] == "app"
    assert store_version(server) == 0


# --- audit -------------------------------------------------------------------------------------


def test_history_names_the_token_the_client_and_the_host(server: AdminServer) -> None:
    call(server, "PATCH", "/v1/apps/blog", json={"add_rules": ["h.example.com:443"]})
    response = call(server, "GET", "/v1/history?app=blog&limit=5", headers=READ)
    assert response.status_code == 200
    (record,) = response.json()["records"]
    assert record["actor"] == {
        "name": "ops",
        "via": "api",
        "host": f"127.0.0.1 via {socket.gethostname()}",
    }
    assert record["version"] == 1
    assert record["changes"][0]["rules_added"] == ["h.example.com:443"]
    assert call(server, "GET", "/v1/history?limit=0").status_code == 400
    assert call(server, "GET", "/v1/history?app=Not%20A%20Name").status_code == 400


# --- check -------------------------------------------------------------------------------------


def test_check_decides_through_a_real_resolver(server: AdminServer, dns: DnsStub) -> None:
    allowed = call(server, "GET", "/v1/apps/blog/check?destination=api.example.com:443")
    assert allowed.status_code == 200
    verdict = allowed.json()
    assert verdict["allowed"] is True
    assert verdict["rule"] == "api.example.com:443"
    assert verdict["addresses"] == [PUBLIC_ADDRESS]
    assert ("api.example.com", "A") in dns.queries
    denied = call(
        server, "POST", "/v1/apps/blog/check", json={"destination": "api.example.com:80"},
        headers=READ,
    )  # fmt: skip
    assert denied.status_code == 200
    assert denied.json()["allowed"] is False
    assert denied.json()["reason"] == "not_allowed"
    call(server, "PATCH", "/v1/apps/blog", json={"add_rules": ["internal.example.org:443"]})
    special = call(server, "GET", "/v1/apps/blog/check?destination=internal.example.org:443")
    assert special.json()["allowed"] is False
    assert special.json()["reason"] == "special_address"
    bad = call(server, "GET", "/v1/apps/blog/check?destination=api.example.com")
    assert bad.status_code == 400
    assert error_of(bad)["problems"][0]["key"] == "destination"


# --- health and metrics --------------------------------------------------------------------------


def test_readyz_needs_the_store_to_answer(dns: DnsStub) -> None:
    answers = {"now": False}

    async def store_ready() -> bool:
        return answers["now"]

    with AdminServer(store_ready=store_ready) as server:
        assert call(server, "GET", "/readyz", headers={}).status_code == 503
        answers["now"] = True
        assert call(server, "GET", "/readyz", headers={}).status_code == 200
        assert call(server, "GET", "/healthz", headers={}).status_code == 200


def test_requests_are_counted_by_route_template_never_by_path(server: AdminServer) -> None:
    for name in ["blog", "shop", "nosuch"]:
        call(server, "GET", f"/v1/apps/{name}")
    call(server, "GET", "/v1/apps/blog", headers={})
    call(server, "GET", "/v1/what/ever")
    assert call(server, "POST", "/v1/apps").status_code == 405  # a known path, a wrong method
    text = call(server, "GET", "/metrics", headers={}).text
    lines = [line for line in text.splitlines() if line.startswith("egress_admin_requests_total")]
    route = 'route="/v1/apps/{name}"'
    assert f'egress_admin_requests_total{{method="GET",{route},status="200"}} 2.0' in lines
    assert f'egress_admin_requests_total{{method="GET",{route},status="404"}} 1.0' in lines
    assert f'egress_admin_requests_total{{method="GET",{route},status="401"}} 1.0' in lines
    assert 'egress_admin_requests_total{method="GET",route="unmatched",status="404"} 1.0' in lines
    assert 'egress_admin_requests_total{method="POST",route="/v1/apps",status="405"} 1.0' in lines
    assert "blog" not in "\n".join(lines) and "/v1/what" not in text
    assert f"egress_admin_request_seconds_count{{{route}}} 4.0" in text


def test_token_hashes_compare_every_configured_token() -> None:
    """The token check finds a token whatever its place among the configured ones."""
    from egress.admin.auth import TokenCheck
    from egress.config.model import AdminRole, AdminToken

    tokens = [
        AdminToken(f"t{i}", hashlib.sha256(f"secret-{i}".encode()).hexdigest(), AdminRole.READ)
        for i in range(5)
    ]
    check = TokenCheck(tokens)
    assert [check.identify(f"secret-{i}") for i in range(5)] == tokens
    assert check.identify("secret-5") is None


def test_a_large_import_and_listing_go_through(dns: DnsStub) -> None:
    """Bodies over 64 KiB are read, and sets over 500 apps serialised, off the event loop."""
    apps = [
        {
            "name": f"app{i}",
            "uids": [str(20000 + i)],
            "allow": [f"h{i}-{j}.example.com:443" for j in range(5)],
        }
        for i in range(600)
    ]
    with AdminServer(max_body_bytes=4 * 1024 * 1024) as server:
        body = json.dumps({"app": apps}).encode()
        assert len(body) > 64 * 1024
        response = call(
            server, "POST", "/v1/import", data=body,
            headers={**WRITE, "Content-Type": "application/json"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 1
        listing = call(server, "GET", "/v1/apps").json()
        assert [app["name"] for app in listing["apps"]] == [app["name"] for app in apps]
        assert all(app["rules"] == 5 for app in listing["apps"])
        assert len(call(server, "GET", "/v1/export").json()["app"]) == 600
