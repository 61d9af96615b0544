"""Remote image downloads that reach public addresses only.

A server that fetches URLs for its clients must not become their way into its own network: every connection
(redirects included) resolves the host name first and connects to the resolved address only if every address the
name has is public - not loopback, private, link-local, shared, reserved or multicast - so a name that resolves
to 127.0.0.1 or 169.254.169.254 is never reached, however it is spelt. The check sits in httpcore's network
backend, where the connection is made, so what was checked is what is connected to (no second lookup). Proxies
from the environment are not used: the proxy, not the image host, would be the address connected to.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

import anyio
import httpcore
import httpx

logger = logging.getLogger("llava_lite.serve")


def is_public(address: str) -> bool:
    """An address on the public internet (an IPv4 address mapped into IPv6 is judged as itself)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone index (fe80::1%eth0) is link-local anyway
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PublicAddressesOnly(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise httpcore.ConnectError(f"{host} does not resolve ({err})") from None
        addresses = list(dict.fromkeys(info[4][0] for info in found))
        refused = [address for address in addresses if not is_public(address)]
        if not addresses or refused:
            raise httpcore.ConnectError(f"{host} resolves to {refused[0] if refused else 'nothing'}, not public")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as err:
                error = err
        raise error  # type: ignore[misc] - addresses is not empty

    async def connect_unix_socket(self, path: str, timeout=None, socket_options=None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not remote images")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class PublicTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, connecting through `_PublicAddressesOnly`."""

    def __init__(self) -> None:
        super().__init__(trust_env=False)
        # httpx builds its connection pool without a way to pass a network backend; the pool is the same one,
        # given ours (httpcore's documented extension point for how connections are made).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_PublicAddressesOnly()
        )


def remote_client(public_only: bool) -> httpx.AsyncClient:
    """A client for one download: redirects followed (each new connection checked), no environment proxies, no
    time limit of its own (the caller's covers the whole download)."""
    transport = PublicTransport() if public_only else httpx.AsyncHTTPTransport(trust_env=False)
    return httpx.AsyncClient(transport=transport, follow_redirects=True, max_redirects=3, timeout=None, trust_env=False)
