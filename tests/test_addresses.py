"""The download address rule, in every spelling of an address (pure: no network)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kling_async.http.addresses import AddressPolicy, AddressRefused, is_public, parse_ip_literal

# An independent oracle: IANA's special-purpose registries and multicast, written out here
# rather than taken from the module under test.
SPECIAL_V4 = [
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


def public_v4(address: ipaddress.IPv4Address) -> bool:
    return not any(address in network for network in SPECIAL_V4)


def spellings(address: ipaddress.IPv4Address) -> list[str]:
    """Ways a URL host can spell an IPv4 address that resolvers accept."""
    value = int(address)
    a, b, c, d = address.packed
    return [
        str(address),
        str(value),
        hex(value),
        f"0{value:o}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{hex(a)}.{hex(b)}.{hex(c)}.{hex(d)}",
        f"0{a:o}.{b}.{c}.{d}",
        f"[::ffff:{address}]",
        f"[::ffff:{(value >> 16):x}:{(value & 0xFFFF):x}]",
        f"[64:ff9b::{address}]",
        f"[2002:{(value >> 16):x}:{(value & 0xFFFF):x}::1]",
        f"{address}.",
    ]


@given(st.ip_addresses(v=4))
def test_every_spelling_of_an_ipv4_address_reads_as_that_address(
    address: ipaddress.IPv4Address,
) -> None:
    for spelling in spellings(address)[:8]:
        assert parse_ip_literal(spelling) == address, spelling


@given(st.ip_addresses(v=4))
def test_the_rule_matches_the_registry_in_every_spelling(address: ipaddress.IPv4Address) -> None:
    policy = AddressPolicy.build("api.example.com", allow_private=False)
    for spelling in spellings(address):
        parsed = parse_ip_literal(spelling)
        assert parsed is not None, spelling
        assert is_public(parsed) == public_v4(address), spelling
        if public_v4(address):
            policy.check_host(spelling)
        else:
            with pytest.raises(AddressRefused) as info:
                policy.check_host(spelling)
            assert spelling in str(info.value)
            assert "public addresses" in str(info.value)


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "10.0.0.1",
        "127.0.0.1",
        "[::1]",
        "::",
        "0.0.0.0",  # noqa: S104 (a URL host, not a bind)
        "224.0.0.1",
        "[ff02::1]",
        "[fe80::1%25eth0]",
        "[fc00::1]",
        "[::127.0.0.1]",
        "100.64.0.1",
        "255.255.255.255",
    ],
)
def test_non_public_literals_are_refused_before_any_connection(host: str) -> None:
    with pytest.raises(AddressRefused) as info:
        AddressPolicy.build("api.example.com", allow_private=False).check_host(host)
    assert "allowed_hosts" in str(info.value)


def test_public_addresses_and_names_pass_the_literal_check() -> None:
    policy = AddressPolicy.build("api.example.com", allow_private=False)
    for host in ("8.8.8.8", "[2606:4700::1111]", "cdn.example.net", "cafe", "1.example"):
        policy.check_host(host)


def test_resolved_addresses_must_all_be_public() -> None:
    policy = AddressPolicy.build("api.example.com", allow_private=False)
    policy.check_resolved("cdn.example.net", ["93.184.216.34", "2606:2800:220:1::1"])
    with pytest.raises(AddressRefused) as info:
        policy.check_resolved("cdn.example.net", ["93.184.216.34", "10.1.2.3"])
    assert "cdn.example.net" in str(info.value) and "10.1.2.3" in str(info.value)


def test_the_api_host_allowed_hosts_and_the_opt_in_widen_the_rule() -> None:
    policy = AddressPolicy.build(
        "LocalHost.", ["files.internal", ".corp.example"], allow_private=False
    )
    policy.check_resolved("localhost", ["127.0.0.1"])
    policy.check_resolved("files.internal", ["10.0.0.5"])
    policy.check_resolved("a.b.corp.example", ["192.168.1.1"])
    with pytest.raises(AddressRefused):
        policy.check_resolved("corp.example.evil", ["192.168.1.1"])
    AddressPolicy.build(None, allow_private=True).check_host("127.0.0.1")
