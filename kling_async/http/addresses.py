"""Which addresses a result-file download may connect to (protocol section 3: untrusted URLs).

A result URL comes from the network, and so does every redirect after it: a hostile or
compromised server could point the SDK at a cloud metadata service (169.254.169.254), a
private network or a service on the user's own machine, and the SDK would fetch it and save
the answer as a "clip". So by default a download may connect only to

* the API's own host (any port: that is where the emulator, or a gateway, serves files), and
* hosts whose every address is public: never loopback, private, link-local, shared (CGN),
  unspecified, multicast, reserved or documentation ranges, in any spelling (``2130706433``,
  ``0x7f000001``, ``127.1``, ``[::ffff:127.0.0.1]``, NAT64 and 6to4 forms).

The rule is applied to IP literals before any connection, and to names on the addresses the
resolver returns, which are the only ones the connection may then use (see ``_http``), so a
name that resolves to a private address is refused without a connection and DNS rebinding
between a check and the connect cannot happen. ``allowed_hosts`` names hosts trusted whatever
their addresses (``.example.com`` also covers subdomains) and ``allow_private`` drops the
address rule altogether.

Pure: no IO, so every spelling is testable without a network. A refusal is
:class:`~kling_async._errors.AddressRefused` (defined with every other error; re-exported here).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

import attrs

from kling_async._errors import AddressRefused

__all__ = ["AddressPolicy", "AddressRefused", "IPAddress", "is_public", "parse_ip_literal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: Not public though some Pythons call parts of them global: shared address space (CGN), IETF
#: protocol assignments, the deprecated 6to4 relay anycast. No CDN serves clips from these.
_NOT_PUBLIC_V4 = tuple(
    ipaddress.IPv4Network(network)
    for network in ("100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24")
)
#: What inet_aton would take for an IPv4 address: digits, hex digits and the 0x prefix, dots.
_NUMERIC_HOST = re.compile(r"(?i)^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$")


def normalise_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot: the form hosts are compared in."""
    return host.strip().strip("[]").rstrip(".").lower()


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string spells, in any form a resolver would accept, else None.

    Besides the standard forms this reads what ``inet_aton`` reads (``2130706433``,
    ``0x7f.1``, ``017700000001``, ``127.1``), because the system resolver turns those into
    addresses too; and drops an IPv6 zone (``fe80::1%eth0``).
    """
    text = normalise_host(host)
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.split("%", 1)[0] if ":" in text else text)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text.rstrip(".")))
        except OSError:
            return None
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64, 6to4, Teredo client)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or address in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    packed = int(address)
    if packed >> 32 == 0 and packed > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed)
    return None


def is_public(address: IPAddress) -> bool:
    """True only for a globally routable unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded)
        return address.is_global and not (
            address.is_multicast
            or address.is_link_local
            or address.is_site_local
            or address.is_reserved
        )
    return (
        address.is_global
        and not any(address in network for network in _NOT_PUBLIC_V4)
        and not (
            address.is_multicast
            or address.is_reserved
            or address.is_loopback
            or address.is_link_local
            or address.is_unspecified
            or address.is_private
        )
    )


def _kind(address: IPAddress) -> str:
    if isinstance(address, ipaddress.IPv6Address) and _embedded_ipv4(address) is not None:
        embedded = _embedded_ipv4(address)
        assert embedded is not None
        return f"an IPv6 form of {_kind(embedded)}"
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{name}", False):
            return f"a {name.replace('_', '-')} address ({address})"
    return f"a non-public address ({address})"


@attrs.frozen
class AddressPolicy:
    """The download rule for one client and one set of options (see the module docstring).

    ``trusted`` holds normalised host names allowed whatever their addresses (the API's host
    and ``allowed_hosts``); an entry starting with ``.`` covers that domain's subdomains.
    """

    trusted: frozenset[str]
    allow_private: bool = False

    @classmethod
    def build(
        cls, api_host: str | None, allowed_hosts: Iterable[str] = (), *, allow_private: bool
    ) -> AddressPolicy:
        hosts = {normalise_host(host) for host in allowed_hosts}
        if api_host:
            hosts.add(normalise_host(api_host))
        return cls(frozenset(hosts), allow_private)

    def trusts(self, host: str) -> bool:
        name = normalise_host(host)
        if name in self.trusted:
            return True
        return any(entry.startswith(".") and name.endswith(entry) for entry in self.trusted)

    def check_host(self, host: str) -> None:
        """Before connecting: refuse an IP literal (any spelling) the rule forbids."""
        if self.allow_private or self.trusts(host):
            return
        address = parse_ip_literal(host)
        if address is not None and not is_public(address):
            raise AddressRefused(host, f"is {_kind(address)}: {self.rule}")

    def check_resolved(self, host: str, addresses: Iterable[str]) -> None:
        """After resolving a name: every address must be allowed, or none is used."""
        if self.allow_private or self.trusts(host):
            return
        for text in addresses:
            address = parse_ip_literal(text)
            if address is None or not is_public(address):
                kind = _kind(address) if address is not None else f"unreadable ({text!r})"
                raise AddressRefused(host, f"resolves to {kind}: {self.rule}")

    @property
    def rule(self) -> str:
        return (
            "downloads go only to the API's own host or to public addresses "
            "(allow it with allowed_hosts, or allow_private=True)"
        )
