"""The SSRF guard refuses non-public addresses, whether literal or reached through DNS."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import strategies as st

from bridge.sinks.netguard import (
    ForbiddenAddress,
    GuardedResolver,
    check_literal_host,
    refusal_reason,
)

# Written out from the IANA special-purpose registries (RFC 6890 and successors), independently
# of the module's own table.
REFUSED_NETWORKS = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "::/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "2002::/16",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
]
# Blocks of large public services: a webhook receiver may live here.
PUBLIC_NETWORKS = ["8.8.8.0/24", "1.1.1.0/24", "151.101.0.0/16", "2606:4700::/32", "2a00:1450::/32"]


@st.composite
def address_in(draw: st.DrawFn, networks: list[str]) -> IPv4Address | IPv6Address:
    network = ipaddress.ip_network(draw(st.sampled_from(networks)))
    offset = draw(st.integers(min_value=0, max_value=network.num_addresses - 1))
    return network.network_address + offset


@given(address_in(REFUSED_NETWORKS))
def test_special_purpose_addresses_are_refused(address: IPv4Address | IPv6Address) -> None:
    assert refusal_reason(address) is not None


@given(address_in(PUBLIC_NETWORKS))
def test_public_addresses_are_allowed(address: IPv4Address | IPv6Address) -> None:
    assert refusal_reason(address) is None


@given(st.ip_addresses(v=4))
def test_ipv4_wrapped_in_ipv6_is_refused_whatever_it_carries(v4: IPv4Address) -> None:
    mapped = IPv6Address(f"::ffff:{v4}")
    nat64 = IPv6Address(int(IPv6Address("64:ff9b::")) | int(v4))
    six_to_four = IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1)
    assert refusal_reason(mapped) == "ipv4-mapped"
    assert refusal_reason(nat64) == "nat64"
    assert refusal_reason(six_to_four) == "6to4"


@given(st.ip_addresses())
def test_anything_allowed_is_global_unicast(address: IPv4Address | IPv6Address) -> None:
    if refusal_reason(address) is None:
        assert address.is_global
        assert not (address.is_multicast or address.is_loopback or address.is_link_local)
        assert not (address.is_private or address.is_reserved or address.is_unspecified)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "ipv4-mapped"),
        ("255.255.255.255", "reserved"),
    ],
)
def test_refusals_say_why(address: str, reason: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.0.0.1", "::ffff:10.0.0.1", "1:2:3:zz::"])
def test_literal_ip_hosts_are_checked_before_connecting(host: str) -> None:
    with pytest.raises(ForbiddenAddress):
        check_literal_host(host)


@pytest.mark.parametrize("host", ["8.8.8.8", "2606:4700::1111", "ci.example.org", "localhost"])
def test_names_and_public_literals_pass_the_literal_check(host: str) -> None:
    check_literal_host(host)  # names are the resolver's job


class FixedResolver(AbstractResolver):
    """DNS answers chosen by the test, as a rebinding attacker would choose them."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_resolver_drops_private_answers_and_keeps_public_ones() -> None:
    resolver = GuardedResolver(FixedResolver("10.0.0.5", "93.184.215.14", "fd00::5"))
    results = await resolver.resolve("ci.example.org", 443)
    assert [r["host"] for r in results] == ["93.184.215.14"]


async def test_resolver_refuses_a_name_with_only_private_answers() -> None:
    resolver = GuardedResolver(FixedResolver("169.254.169.254", "127.0.0.1"))
    with pytest.raises(ForbiddenAddress) as caught:
        await resolver.resolve("metadata.example.org", 80)
    assert caught.value.reason == "link-local"
    assert "metadata.example.org" in str(caught.value)


async def test_localhost_is_refused_after_real_resolution() -> None:
    resolver = GuardedResolver()
    with pytest.raises(ForbiddenAddress) as caught:
        await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert caught.value.reason == "loopback"
    await resolver.close()


@pytest.fixture
async def loopback_server() -> AsyncIterator[tuple[int, list[web.Request]]]:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, seen
    await runner.cleanup()


async def test_aiohttp_with_the_guard_never_reaches_a_loopback_receiver(
    loopback_server: tuple[int, list[web.Request]],
) -> None:
    port, seen = loopback_server
    connector = aiohttp.TCPConnector(resolver=GuardedResolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(ForbiddenAddress):
            await session.post(f"http://localhost:{port}/", data=b"{}")
        # The same server is reachable without the guard: the refusal was the guard's.
        async with (
            aiohttp.ClientSession() as plain,
            plain.post(f"http://localhost:{port}/", data=b"{}") as response,
        ):
            assert response.status == 200
    assert len(seen) == 1
