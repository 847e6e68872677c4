"""Job callbacks that cannot be turned against the network the workers run in.

A key holder names the callback URL, and the worker POSTs to it: without care that is a
server-side request forgery (SSRF) into whatever the worker can reach. So:

- **The address decides, not the spelling.** The host is resolved once per attempt
  (``getaddrinfo``), every resolved address must be public (:func:`refusal`), and the
  connection goes to that validated address, with the original ``Host`` header and TLS
  SNI/certificate name (:class:`PinnedTransport`): a name that resolves differently a second
  time (DNS rebinding) never gets a second lookup. Refused by default: loopback,
  private (RFC 1918, ULA), link-local (169.254.0.0/16 with the cloud metadata service,
  fe80::/10), CGNAT (100.64.0.0/10), multicast, reserved, unspecified (0.0.0.0, ::), and
  the IPv4 inside IPv4-mapped, NAT64, 6to4 and Teredo IPv6 addresses.
- **Spellings.** Numeric hosts are read the way the C resolver reads them
  (``inet_aton``: ``2130706433``, ``0x7f000001``, ``127.1``, ``0177.0.0.1``), so
  :func:`static_refusal` refuses them at submission time already, with ``localhost`` and
  its sub-domains; other names are decided at send time, when they are resolved.
- **An allow-list** (``CXR_CALLBACK_ALLOW``: CIDRs or host names) lets a site reach an
  internal receiver on purpose.
- **One deadline per attempt** (``CXR_CALLBACK_DEADLINE_SECONDS``) covers connecting,
  sending and reading the whole answer: a receiver dripping its answer a byte at a time
  defeats per-read timeouts, not this. Redirects are not followed (a 3xx is a failed attempt).

Standards: RFC 6890 (special-purpose address registries), RFC 6598 (CGNAT), RFC 4291 2.5.5.2
(IPv4-mapped), RFC 6052 (NAT64), RFC 3056 (6to4), RFC 4380 (Teredo), RFC 6066 section 3 (SNI).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# The IANA special-purpose registries' "not globally reachable" blocks (RFC 6890 and updates),
# spelled out so the verdict does not depend on the Python version's ipaddress tables.
_SPECIAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20",
    "5f00::/16", "fc00::/7", "fe80::/10", "ff00::/8",
))


class CallbackRefused(ValueError):
    """The callback URL may not be called; the message is a sentence saying why and what to do."""


@dataclass(frozen=True)
class AllowList:
    """``CXR_CALLBACK_ALLOW``: networks (CIDRs or single addresses) and host names (exact,
    case-insensitive) that may be called even though they are not public."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, entries: list[str]) -> "AllowList":
        """Raises ValueError for an entry that is neither a CIDR/address nor a host name."""
        nets, hosts = [], set()
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not all(c.isalnum() or c in "-._" for c in entry):
                    raise ValueError(f"CXR_CALLBACK_ALLOW: {entry!r} is neither a CIDR nor a host name") from None
                hosts.add(entry.lower().rstrip("."))
        return cls(networks=tuple(nets), hosts=frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    return out


def address_problem(ip: IPAddress) -> str | None:
    """What makes an address unfit for a callback (``"loopback"``, ``"private"``, ...), or None if public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a scoped (link-local) address"
        for v4 in _embedded_v4(ip):
            if (problem := address_problem(v4)) is not None:
                return f"an IPv6 address carrying {v4}, {problem}"
    checks = (
        ("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast), ("site-local (fec0::/10, RFC 3879)", ip.version == 6 and ip.is_site_local),
        ("carrier-grade NAT (100.64.0.0/10)", ip.version == 4 and ip in _CGNAT),
        ("private", ip.is_private), ("reserved", ip.is_reserved), ("not globally routable", not ip.is_global),
        ("special-purpose, not globally reachable (RFC 6890)", any(ip.version == n.version and ip in n
                                                                    for n in _SPECIAL)),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a host string spells, read as the C resolver reads numeric hosts
    (``inet_aton``: decimal, hex, octal and short dotted forms), or None for a name."""
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h)  # IPv4 dotted quad, IPv6 (with a zone id: scoped)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def _split(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise CallbackRefused(f"the callback URL cannot be parsed ({e}); give an http(s) URL") from None
    if parts.scheme not in ("http", "https"):
        raise CallbackRefused("the callback URL must be http:// or https://")
    host = parts.hostname or ""
    if not host:
        raise CallbackRefused("the callback URL has no host")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def _sent_host(url: str) -> str:
    """The host as httpx, which sends the request, reads it (it maps some characters urllib keeps,
    such as U+3002 to "."). Raises CallbackRefused for a URL httpx refuses, or whose host name
    cannot be encoded for the resolver (IDNA, RFC 5891: empty or over-long labels, bad A-labels):
    such a URL can never be delivered, so it is refused, not retried."""
    try:
        host = httpx.URL(url).host
    except (ValueError, httpx.InvalidURL) as e:  # UnicodeError (IDNA) is a ValueError
        raise CallbackRefused(f"the callback URL cannot be parsed ({type(e).__name__}); give an http(s) URL") \
            from None
    if not host:
        raise CallbackRefused("the callback URL has no host")
    if literal_address(host) is None:
        _check_name(host)
    return host


def _check_name(host: str) -> None:
    """Raises CallbackRefused when ``host`` cannot be encoded for the resolver (IDNA)."""
    try:
        host.encode("idna")
    except UnicodeError:
        raise CallbackRefused("the callback URL's host is not a valid DNS name (an empty or over-long label, or "
                              "a malformed internationalised name); give an http(s) URL") from None


def _refused(host: str, ip: IPAddress, problem: str) -> CallbackRefused:
    shown = host.strip("[]")
    where = f"{shown} is " if shown == str(ip) else f"{shown} is {ip}, "
    return CallbackRefused(
        f"callback refused: {where}{problem}; callbacks go only to public addresses. If this receiver is meant to be "
        "internal, add its address (CIDR) or host name to CXR_CALLBACK_ALLOW")


def static_refusal(url: str, allow: AllowList) -> CallbackRefused | None:
    """What can be decided without DNS: the scheme, and a host that is a numeric address (any
    spelling) or a ``localhost`` name, read both as urllib and as httpx (which sends) read it, and a
    URL that can never be sent (httpx refuses it; the host name is not valid IDNA). None: not
    refused yet (names are checked at send time)."""
    try:
        _scheme, host, _port = _split(url)
        if (refusal := _host_refusal(host, allow)) is not None:
            return refusal
        return _host_refusal(_sent_host(url), allow)  # as httpx, which sends, reads it: it must pass too
    except CallbackRefused as e:
        return e


def _host_refusal(host: str, allow: AllowList) -> CallbackRefused | None:
    if allow.allows_host(host):
        return None
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return CallbackRefused(f"callback refused: {host} is loopback; callbacks go only to public addresses. If this "
                               "receiver is meant to be internal, add it to CXR_CALLBACK_ALLOW")
    ip = literal_address(host)
    if ip is not None and not allow.allows_address(ip) and (problem := address_problem(ip)) is not None:
        return _refused(host, ip, problem)
    return None


def resolve_checked(host: str, port: int, allow: AllowList) -> IPAddress:
    """Resolve ``host`` once and return the address to connect to. Every resolved address must
    be public (or allowed): one bad address among good ones refuses the lot, so a resolver
    cannot slip one in. Raises CallbackRefused; OSError (gaierror) when the name does not resolve."""
    literal = literal_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        _check_name(host)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(sockaddr[0]) for *_rest, sockaddr in infos]
        if not addresses:
            raise OSError(f"{host} resolves to no address")
    if not allow.allows_host(host):
        for ip in addresses:
            if not allow.allows_address(ip) and (problem := address_problem(ip)) is not None:
                raise _refused(host, ip, problem)
    return addresses[0]


class PinnedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport that connects only to a validated address: the request's host is
    resolved once (:func:`resolve_checked`) and the connection goes to that IP, while the
    ``Host`` header and, for https, the TLS SNI and certificate check keep the original name."""

    def __init__(self, allow: AllowList, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow = allow

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        ip = await loop.run_in_executor(None, resolve_checked, host, port, self.allow)
        if str(ip) != host.strip("[]"):
            request.url = request.url.copy_with(host=str(ip))  # the Host header was set from the original URL
            if request.url.scheme == "https":
                request.extensions = {**request.extensions, "sni_hostname": host}
        return await super().handle_async_request(request)


class AttemptFailed(Exception):
    """One delivery attempt failed in a way worth retrying; ``reason`` is a short sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def post_json(url: str, body: dict[str, Any], *, allow: AllowList, deadline_seconds: float) -> int:
    """POST ``body`` as JSON to ``url`` through :class:`PinnedTransport`, within one total
    deadline (connect, send, and read the whole answer). Returns the 2xx status.

    Raises CallbackRefused (the address is not allowed: do not retry) or AttemptFailed
    (network error, timeout, non-2xx answer, redirect: retry later)."""
    if (refusal := static_refusal(url, allow)) is not None:
        raise refusal
    per_op = httpx.Timeout(deadline_seconds)

    async def send() -> int:
        async with httpx.AsyncClient(transport=PinnedTransport(allow), timeout=per_op, follow_redirects=False,
                                     trust_env=False) as client:
            r = await client.post(url, json=body)
            await r.aread()
            return r.status_code

    try:
        status = asyncio.run(asyncio.wait_for(send(), timeout=deadline_seconds))
    except CallbackRefused:
        raise
    except (httpx.InvalidURL, UnicodeError) as e:  # never deliverable: do not retry
        raise CallbackRefused(f"the callback URL cannot be sent ({type(e).__name__}); give an http(s) URL") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise AttemptFailed(f"no complete answer within {deadline_seconds:g} s (CXR_CALLBACK_DEADLINE_SECONDS)") \
            from None
    except OSError as e:
        raise AttemptFailed(f"cannot reach the receiver ({type(e).__name__})") from None
    except httpx.HTTPError as e:
        raise AttemptFailed(f"the request failed ({type(e).__name__})") from None
    if not 200 <= status < 300:
        what = "a redirect, which is not followed" if 300 <= status < 400 else "not a success"
        raise AttemptFailed(f"the receiver answered HTTP {status} ({what})")
    return status
