"""The admin API keeps the promises of its own OpenAPI document.

schemathesis takes the document ``GET /v1/openapi.json`` serves, generates requests from it,
valid and invalid, sends them to a live admin listener (a real aiohttp runner on a loopback port,
over a memory store, with a write token and a checker that resolves through a DNS stub) and
checks every answer: no 5xx, a status the document lists for that operation, the documented
content type, headers and body schema, invalid input refused with a 4xx, a request without the
token refused, an undocumented method refused with 405 and Allow. The document must also list
every route the router serves, and nothing else.

Bounded: 25 generated examples an operation (plus schemathesis's explicit examples and coverage
cases), no deadline (the machine is shared); about 15 s in all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from egress.admin.openapi import openapi_document
from tests.adminserver import WRITE_TOKEN, AdminServer
from tests.dnsstub import DnsStub

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[AdminServer]:
    dns = DnsStub({"api.example.com": ["93.184.215.14"]})
    with dns, AdminServer(nameserver=dns.address, max_body_bytes=MAX_BODY_BYTES) as admin:
        yield admin


# The document is loaded from the module that serves it, at import, because schemathesis needs
# it to make one test per operation at collection time (its fixture-based loader,
# schemathesis.pytest.from_fixture, fails under pytest 9.2: it writes Function._nodeid, which
# pytest no longer has). test_served_document_is_the_one_tested checks that the live listener
# serves exactly this document.
#
# The token goes in through schemathesis's own auth config (not a fixed header), so it knows
# when a generated case leaves it out on purpose (and expects a 401). A schema-valid body is not
# always a valid edit: uids that overlap another app, uid 0 in a range, a rule string that does
# not parse. Those are 400 by design, so "valid data must be accepted" is off; every other
# check is on.
CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"bearer": {"bearer": WRITE_TOKEN}}},
        "checks": {"positive_data_acceptance": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(
    openapi_document(max_body_bytes=MAX_BODY_BYTES), config=CONFIG
)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_keeps_its_openapi_document(case: Any, server: AdminServer) -> None:
    case.call_and_validate(base_url=server.url, timeout=10)


def test_document_describes_every_route_and_only_those(server: AdminServer) -> None:
    document = openapi_document(max_body_bytes=MAX_BODY_BYTES)
    described = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert server.app is not None
    served = {
        (route.method, route.resource.canonical)
        for route in server.app.router.routes()
        if route.resource is not None
    }
    assert described == served
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    public = {
        path
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method != "parameters" and operation.get("security") == []
    }
    assert public == {"/v1/openapi.json", "/healthz", "/readyz", "/metrics"}


def test_served_document_is_the_one_tested(server: AdminServer) -> None:
    served = requests.get(f"{server.url}/v1/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.json() == openapi_document(max_body_bytes=MAX_BODY_BYTES)
