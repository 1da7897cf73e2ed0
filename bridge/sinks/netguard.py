"""SSRF guard: webhooks go to the public internet only, unless a subscription allows otherwise.

The check is made on the address actually connected to, after DNS resolution,
so a receiver's name that resolves (or later re-resolves) to 127.0.0.1 or to
a cloud metadata address is refused. aiohttp skips the resolver for IP-literal
URLs, so those are checked separately with ``check_literal_host`` before a
request is sent. Redirects are never followed, so a receiver cannot bounce a
delivery onto an internal address either.

IPv4-mapped, 6to4, Teredo and NAT64 addresses are refused outright rather than
by the IPv4 address they carry: on a DNS64 network a receiver that only has an
IPv4 address therefore needs ``allow_private_network``.
"""

from __future__ import annotations

import ipaddress
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = IPv4Address | IPv6Address

# Most specific first: the first match names the reason.
_REFUSED: tuple[tuple[IPv4Network | IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "private"),  # carrier-grade NAT, shared address space
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # includes 169.254.169.254, cloud metadata
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "6to4"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "ipv4-mapped"),
        ("::/96", "ipv4-mapped"),  # deprecated IPv4-compatible addresses
        ("64:ff9b::/96", "nat64"),
        ("64:ff9b:1::/48", "nat64"),
        ("100::/64", "reserved"),
        ("2001::/32", "teredo"),
        ("2001:db8::/32", "reserved"),
        ("2002::/16", "6to4"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "link-local"),  # deprecated site-local
        ("ff00::/8", "multicast"),
    )
)


class ForbiddenAddress(Exception):
    """A receiver's address is not on the public internet; the webhook sink gives up (``ssrf``)."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(
            f"{host} resolves to {address} ({reason}), refused; "
            "allow_private_network = true on the subscription allows it"
        )
        self.host = host
        self.address = address
        self.reason = reason


def refusal_reason(address: IPAddress) -> str | None:
    """Why a webhook must not connect to ``address`` (a short label), or None if it may."""
    for network, reason in _REFUSED:
        if address.version == network.version and address in network:
            return reason
    # Then the standard library's own tables, in case they know a block we do not.
    for flagged, reason in (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_unspecified, "unspecified"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "not-global"),
    ):
        if flagged:
            return reason
    return None


def _parse(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_literal_host(host: str) -> None:
    """Raise ForbiddenAddress if ``host`` (a URL's host, no brackets) is a refused IP literal.

    Host names pass: ``GuardedResolver`` checks what they resolve to.
    """
    address = _parse(host)
    if address is None:
        if ":" in host:  # aiohttp treats anything with a colon as an IPv6 literal
            raise ForbiddenAddress(host, host, "unparseable")
        return
    reason = refusal_reason(address)
    if reason is not None:
        raise ForbiddenAddress(host, host, reason)


def refused_by_name(host: str) -> ForbiddenAddress | None:
    """What the guard will say of ``host`` at delivery time, asked of this host's resolver
    now (blocking: for ``check-config``, not the event loop). None when an address is
    allowed, or when the name does not resolve here (a connection error then, retried)."""
    if _parse(host) is not None:
        return None  # a literal: check_literal_host's
    try:
        results = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    first: ForbiddenAddress | None = None
    for *_, sockaddr in results:
        address = _parse(str(sockaddr[0]))
        reason = "unparseable" if address is None else refusal_reason(address)
        if reason is None:
            return None
        first = first or ForbiddenAddress(host, str(sockaddr[0]), reason)
    return first


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops refused addresses and fails if none are left.

    Dropping rather than failing on the first bad record lets a receiver whose
    DNS also lists, say, a unique-local IPv6 address still be reached on its
    public one. Build it inside the running loop (the default resolver needs it).
    """

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results:
            return results  # aiohttp reports that as a connection error itself
        allowed: list[ResolveResult] = []
        first_refusal: tuple[str, str] | None = None
        for result in results:
            address = _parse(result["host"])
            reason = "unparseable" if address is None else refusal_reason(address)
            if reason is None:
                allowed.append(result)
            elif first_refusal is None:
                first_refusal = (result["host"], reason)
        if first_refusal is not None and not allowed:
            raise ForbiddenAddress(host, *first_refusal)
        return allowed

    async def close(self) -> None:
        await self._inner.close()
