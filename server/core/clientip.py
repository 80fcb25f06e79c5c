"""The client's address, as far as this server can know it, and the key limits count it by.

Behind proxies, ``X-Forwarded-For`` is a list that every proxy appends its peer to; only
the entries appended by proxies we trust are facts, the rest were written by the client.
So the client address is the right-most entry that is not a trusted proxy, and the
header is read at all only when the direct peer is a proxy (``trust_peer``, for proxies
whose addresses are not known in advance such as Heroku's router, or a peer inside
``trusted``). The left-most entry, which the client chooses, is never used on its own.

Limits count IPv6 clients by their /64 (one subscriber's allocation: a client owns all
of it and could otherwise rotate addresses for free) and IPv4-mapped IPv6 addresses as
the IPv4 address.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """An address from a header entry (``[v6]:port`` and ``v4:port`` tolerated), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """Works out the client IP of a request from its direct peer and forwarded header."""

    def __init__(self, trust_peer: bool, trusted: list[str]) -> None:
        self.trust_peer = trust_peer
        self.trusted = [ipaddress.ip_network(item, strict=False) for item in trusted]

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)

    def of(self, peer: str, forwarded: str = "") -> str:
        """The client IP: ``peer``, or the right-most untrusted entry of ``forwarded``."""
        peer_ip = parse_ip(peer)
        if not forwarded or peer_ip is None:
            return str(peer_ip) if peer_ip is not None else (peer or "unknown")
        if not (self.trust_peer or self.is_trusted(peer_ip)):
            return str(peer_ip)
        client = peer_ip
        for entry in reversed(forwarded.split(",")):
            hop = parse_ip(entry)
            if hop is None:  # garbage: whatever is left of it was written by the client
                break
            client = hop
            if not self.is_trusted(hop):
                break
        return str(client)


@lru_cache(maxsize=4096)
def limit_key(ip: str) -> str:
    """What per-IP limits count: the IPv4 address, or the /64 of an IPv6 address."""
    address = parse_ip(ip)
    if address is None:
        return ip[:64]
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
