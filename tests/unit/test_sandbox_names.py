"""Synthetic addresses (egress/sandbox/names.py): a name keeps one address in each family for
the life of the process, the address leads back to the name, and nothing else does."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from egress.sandbox import names
from egress.sandbox.names import SYNTHETIC_V4, SYNTHETIC_V6, NameTable, normalize

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def test_same_name_same_address_and_a_new_name_a_new_one() -> None:
    table = NameTable()
    first = table.v4("api.example.com")
    assert table.v4("api.example.com") == first
    other = table.v4("db.example.com")
    assert other != first
    assert table.v4("api.example.com") == first  # allocating another name moved nothing
    assert len(table) == 2


@pytest.mark.parametrize("spelling", ["API.Example.COM", "api.example.com.", "Api.Example.Com."])
def test_case_and_trailing_dot_are_one_name(spelling: str) -> None:
    table = NameTable()
    address = table.v4("api.example.com")
    assert table.v4(spelling) == address
    assert table.v6(spelling) == table.v6("api.example.com")
    assert table.name_for(V4(address)) == "api.example.com"
    assert len(table) == 1
    assert normalize(spelling) == "api.example.com"


def test_addresses_are_in_the_synthetic_ranges_and_both_families_share_the_number() -> None:
    table = NameTable()
    v4, v6 = V4(table.v4("a.example")), V6(table.v6("a.example"))
    assert v4 in SYNTHETIC_V4 and v6 in SYNTHETIC_V6
    assert (v4, v6) == (V4("240.0.0.1"), V6("100::1"))
    assert (V4(table.v4("b.example")), V6(table.v6("b.example"))) == (V4("240.0.0.2"), V6("100::2"))
    # Every synthetic address is special-purpose to the proxy: one that escapes is refused there.
    assert v4.is_reserved and not v4.is_multicast


def test_name_for_round_trips_in_both_families() -> None:
    table = NameTable()
    spelled = [f"host{i}.example" for i in range(50)]
    for name in spelled:
        assert table.name_for(V4(table.v4(name))) == name
        assert table.name_for(V6(table.v6(name))) == name


def test_an_unallocated_or_foreign_address_stands_for_no_name() -> None:
    table = NameTable()
    table.v4("only.example")
    for address in ("240.0.0.0", "240.0.0.2", "255.255.255.254", "203.0.113.7", "127.0.0.1"):
        assert table.name_for(V4(address)) is None, address
    for address in ("100::", "100::2", "100:0:0:1::1", "2001:db8::1", "::1"):
        assert table.name_for(V6(address)) is None, address


def test_an_ipv4_mapped_synthetic_address_stands_for_its_name() -> None:
    table = NameTable()
    address = table.v4("mapped.example")
    assert table.name_for(V6(f"::ffff:{address}")) == "mapped.example"
    assert table.name_for(V6("::ffff:240.0.0.9")) is None
    assert table.name_for(V6("::ffff:203.0.113.7")) is None


def test_the_broadcast_address_is_never_handed_out() -> None:
    """The highest number the table gives (MAX_NAMES) is far below 255.255.255.255."""
    highest = V4(int(SYNTHETIC_V4.network_address) + names.MAX_NAMES)
    assert highest in SYNTHETIC_V4
    assert highest < SYNTHETIC_V4.broadcast_address == V4("255.255.255.255")
    assert V6(int(SYNTHETIC_V6.network_address) + names.MAX_NAMES) in SYNTHETIC_V6


def test_a_full_table_refuses_new_names_and_keeps_the_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "MAX_NAMES", 3)
    table = NameTable()
    kept = [table.v4(f"n{i}.example") for i in range(3)]
    with pytest.raises(OverflowError, match="more than 3 host names"):
        table.v4("one-too-many.example")
    with pytest.raises(OverflowError):
        table.v6("one-too-many.example")
    assert [table.v4(f"N{i}.example.") for i in range(3)] == kept  # known names still answer
    assert len(table) == 3
    assert table.name_for(V4(kept[-1])) == "n2.example"


def test_threads_racing_for_the_same_names_get_the_same_addresses() -> None:
    table = NameTable()
    wanted = [f"race{i}.example" for i in range(200)]
    seen: list[dict[str, str]] = []
    start = threading.Barrier(8)

    def worker(order: list[str]) -> None:
        start.wait(timeout=10)
        seen.append({name: table.v4(name) for name in order})

    threads = [
        threading.Thread(target=worker, args=(wanted[::-1] if i % 2 else wanted,)) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(seen) == 8
    assert all(answer == seen[0] for answer in seen)
    assert len(set(seen[0].values())) == len(wanted) == len(table)
