"""The SSRF guard for callback URLs: which URLs a tenant may give, and which addresses they may reach.

A URL is checked when the export is created and again at send time, against every address its host
resolves to; the sender then connects to one of those checked addresses itself (the request is
pinned), so a DNS answer that changes between check and connect cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import NoReturn, Union
from urllib.parse import urlsplit

from pulse_exports.catalog import ExportRequestError

FIELD = "callback_url"
ALLOWLIST_ENV = "PULSE_CALLBACK_ALLOWLIST"
MAX_URL_LENGTH = 2048

# Union, not `|`: this alias is evaluated at import and the package supports Python 3.10.
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # noqa: UP007

# Not is_private in Python's table, but never a callback receiver: carrier-grade NAT (RFC 6598).
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
# The legacy IPv4 spellings inet_aton accepts: 2130706433, 0x7f000001, 0177.0.0.1, 127.1.
_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


def _refuse(message: str) -> NoReturn:
    raise ExportRequestError(FIELD, message)


@dataclass(frozen=True)
class Allowlist:
    """Operator exceptions to the guard: hostnames (``hooks.internal``, ``*.corp.example``) and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, value: str | None) -> Allowlist:
        """``PULSE_CALLBACK_ALLOWLIST`` syntax: comma-separated hostnames and/or CIDRs."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in (value or "").split(","):
            item = raw.strip().lower()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    @classmethod
    def from_env(cls) -> Allowlist:
        return cls.parse(os.environ.get(ALLOWLIST_ENV))

    def permits_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.hosts or any(h.startswith("*.") and host.endswith(h[1:]) for h in self.hosts)

    def permits_address(self, address: IPAddress) -> bool:
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(a in net for a in candidates for net in self.networks)


def address_refusal(address: IPAddress) -> str | None:
    """Why a callback may not reach ``address`` (e.g. "a loopback address"), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour  # ::ffff:127.0.0.1, 2002:7f00:1::
        if embedded is not None:
            return address_refusal(embedded)
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a non-public address"
    return None


@dataclass(frozen=True)
class CallbackTarget:
    """A checked callback URL and the checked addresses of its host, in the resolver's order."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[IPAddress, ...]

    @property
    def host_is_ip(self) -> bool:
        return _ip_literal(self.host) is not None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def pinned_url(self, address: IPAddress) -> str:
        """The URL with its host replaced by ``address``: the request goes there and nowhere else."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    literal = _ip_literal(host)
    if literal is not None:
        return (literal,)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        _refuse("its host does not resolve")
    addresses: dict[IPAddress, None] = {}
    for *_, sockaddr in infos:
        try:
            addresses[ipaddress.ip_address(str(sockaddr[0]))] = None
        except ValueError:
            _refuse("its host resolves to an address that is not IP")
    if not addresses:
        _refuse("its host does not resolve")
    return tuple(addresses)


def resolve_callback_target(url: object, allowlist: Allowlist | str | None) -> CallbackTarget:
    """Check ``url`` and every address its host resolves to; raise ExportRequestError("callback_url", ...)."""
    if isinstance(allowlist, str) or allowlist is None:
        allowlist = Allowlist.parse(allowlist)
    if not isinstance(url, str) or not url:
        _refuse("must be an http or https URL")
    if len(url) > MAX_URL_LENGTH:
        _refuse(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        _refuse("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        _refuse("is not a valid URL")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        _refuse("must use http or https")
    if "@" in parts.netloc:
        _refuse("must not contain credentials (user:password@)")
    if not parts.hostname or not parts.hostname.rstrip("."):
        _refuse("must name a host")
    try:
        host = parts.hostname.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        _refuse("has a host name that is not valid")
    port = port or (443 if scheme == "https" else 80)
    literal = _ip_literal(host)
    if literal is not None:
        host = str(literal)  # 0x7f000001 -> 127.0.0.1: one spelling for the Host header and TLS
    addresses = _resolve(host, port)
    if not allowlist.permits_host(host):
        for address in addresses:
            reason = None if allowlist.permits_address(address) else address_refusal(address)
            if reason:
                _refuse(f"resolves to {reason}, which callbacks may not reach unless an operator allowlists it")
    path = parts.path or "/"
    return CallbackTarget(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        path=f"{path}?{parts.query}" if parts.query else path,
        addresses=addresses,
    )


def validate_callback_url(url: object, allowlist: Allowlist | str | None) -> str:
    """The callback URL if it may be used; else ExportRequestError naming ``callback_url`` (the API's 422).

    ``allowlist`` is the operator's exception list (``Allowlist.from_env()`` reads PULSE_CALLBACK_ALLOWLIST);
    None permits nothing internal. Resolves the host: call it off the event loop in async code.
    """
    return resolve_callback_target(url, allowlist).url
