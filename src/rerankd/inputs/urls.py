"""Fetching image URLs safely: http(s) only, public addresses only (unless allowed), redirects re-checked,
bytes counted while downloading, one deadline for the whole fetch.

A server that fetches URLs its clients name must not become a way into its own network (SSRF): every host is
resolved and refused if any of its addresses is loopback, private, link-local, multicast, reserved or otherwise
not global, and each redirect target is checked the same way before it is followed. The connection then goes to
the address that was checked (no second lookup a DNS-rebinding server could answer differently).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import InputError

MAX_REDIRECTS = 5


# IPv6 prefixes whose last 32 bits are an IPv4 address that the packet reaches: IPv4-compatible (::a.b.c.d),
# SIIT's IPv4-translated (::ffff:0:a.b.c.d) and NAT64's well-known and local-use prefixes (RFC 6052, 8215)
EMBEDDING_PREFIXES = tuple(ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48"))


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: mapped, 6to4, Teredo's client, or in a translation prefix."""
    found = [a for a in (addr.ipv4_mapped, addr.sixtofour, addr.teredo and addr.teredo[1]) if a is not None]
    if any(addr in net for net in EMBEDDING_PREFIXES):
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable address; an IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo, NAT64,
    IPv4-compatible or translated) is public only if that IPv4 address is too."""
    if addr.is_multicast:  # is_global says True for it on some Pythons (3.11: 224.0.0.0/4), and for fec0::/10
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:
            return False
        inner = embedded_ipv4(addr)
        if inner:
            return all(is_public(a) for a in inner) and (addr.ipv4_mapped is not None or addr.is_global)
    return addr.is_global


def resolve_public(host: str, port: int, allow_private: bool, param: str) -> list[tuple]:
    """getaddrinfo results for host, refusing non-public addresses unless allow_private."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"cannot resolve image host {host!r} ({getattr(e, 'strerror', None) or e})", param) from None
    if not allow_private:
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if not is_public(addr):
                raise InputError(
                    f"image host {host!r} resolves to the non-public address {addr}; fetching from private networks "
                    f"is not allowed (the server's --allow-private-urls allows it)",
                    param,
                )
    return infos


def _pinned_connection(cls: type, infos: list[tuple]):
    """An http.client connection class that connects to the already checked addresses, not a fresh lookup."""

    class Pinned(cls):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            last: OSError | None = None
            for family, socktype, proto, _, sockaddr in infos:
                sock = socket.socket(family, socktype, proto)
                self.raw_sock = sock  # what fetch_url's deadline cuts (under TLS too)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(sockaddr)
                except OSError as e:
                    sock.close()
                    last = e
                    continue
                if cls is http.client.HTTPSConnection:
                    self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
                else:
                    self.sock = sock
                return
            raise last or OSError("no address to connect to")

    return Pinned


def _cut(conn: http.client.HTTPConnection) -> None:
    """End the connection's socket: a connect, handshake or read blocked on it returns at once."""
    sock = getattr(conn, "raw_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def fetch_url(url: str, max_bytes: int, timeout: float, allow_private: bool, param: str) -> bytes:
    """GET url following at most MAX_REDIRECTS redirects, each target checked; at most max_bytes, within timeout
    in all: a timer cuts the connection at the deadline, so a server that sends its head or body a byte at a time
    (each read within the socket's timeout) holds a preparing thread no longer than that."""
    deadline = time.monotonic() + timeout

    def too_slow() -> InputError:  # of the URL being fetched now (a redirect's target)
        return InputError(f"fetching {url} took longer than {timeout:g}s", param)

    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"image URL {url!r} is not an http(s) URL", param)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise InputError(f"image URL {url!r}: {e}", param) from None
        infos = resolve_public(parts.hostname, port, allow_private, param)
        base = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        left = deadline - time.monotonic()
        if left <= 0:
            raise too_slow()
        conn = _pinned_connection(base, infos)(parts.hostname, port, timeout=left)
        timed_out = threading.Event()
        timer = threading.Timer(left, lambda conn=conn: (timed_out.set(), _cut(conn)))
        timer.daemon = True
        timer.start()
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("GET", path, headers={"User-Agent": "rerankd", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise InputError(f"fetching {url} failed: HTTP {resp.status} without a Location", param)
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise InputError(f"fetching {url} failed: HTTP {resp.status}", param)
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise InputError(f"image at {url} is {declared} bytes, over the limit of {max_bytes}", param)
            chunks, total = [], 0
            while chunk := resp.read(65536):
                total += len(chunk)
                if total > max_bytes:
                    raise InputError(f"image at {url} is over the limit of {max_bytes} bytes", param)
                chunks.append(chunk)
            if timed_out.is_set() or time.monotonic() > deadline:  # cut there: what arrived is not the whole image
                raise too_slow()
            return b"".join(chunks)
        except InputError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            if timed_out.is_set():
                raise too_slow() from None
            raise InputError(f"fetching {url} failed: {e or type(e).__name__}", param) from None
        finally:
            timer.cancel()
            conn.close()
    raise InputError(f"fetching the image followed more than {MAX_REDIRECTS} redirects", param)
