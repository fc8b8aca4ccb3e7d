"""Where the remote actors' sockets listen: the learner's bind address for each launcher, and the network
interface holding an address (gloo listens on an *interface*, chosen by ``GLOO_SOCKET_IFNAME``).

Standard library only (Linux: the ``SIOCGIFADDR`` ioctl for IPv4, ``/proc/net/if_inet6`` for IPv6).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterator

log = logging.getLogger("lit_impala.actors.remote")

GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"
_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address


def default_bind_address(launcher: str) -> str | None:
    """Where the learner listens when ``data.remote_bind_address`` is null: loopback for ``mp`` (every node
    is on this host), this host name's address for ``submitit`` (SLURM jobs run on other hosts), and
    nowhere for ``external`` (the user must choose: None)."""
    if launcher == "mp":
        return "127.0.0.1"
    if launcher == "submitit":
        return socket.gethostbyname(socket.gethostname())
    return None


def is_wildcard(address: str) -> bool:
    """``0.0.0.0`` or ``::``: every interface."""
    return _ip(address) is not None and _ip(address).is_unspecified


def reachable_host(bind_address: str) -> str:
    """The address a node on this host connects to for ``bind_address`` (loopback for a wildcard)."""
    if not is_wildcard(bind_address):
        return bind_address
    return "::1" if _ip(bind_address).version == 6 else "127.0.0.1"


def interface_holding(address: str) -> str | None:
    """Name of this host's network interface with ``address`` (``"lo"`` for ``127.0.0.1``); None if none
    has it. A loopback address that no interface lists (``127.0.1.1``) maps to the loopback interface."""
    ip = _ip(address)
    if ip is None or ip.is_unspecified:
        return None
    found = _ipv4_interfaces() if ip.version == 4 else _ipv6_interfaces()
    if ip in found:
        return found[ip]
    if ip.is_loopback:
        return next((name for held, name in found.items() if held.is_loopback), None)
    return None


@contextlib.contextmanager
def gloo_listens_on(address: str) -> Iterator[None]:
    """While the process group is made: gloo listens on the interface holding ``address`` (its own choice
    is this host name's address, maybe a public one). Leaves a ``GLOO_SOCKET_IFNAME`` the user set alone;
    a wildcard ``address`` keeps gloo's choice."""
    interface = None if GLOO_INTERFACE_ENV in os.environ or is_wildcard(address) else interface_holding(address)
    if interface is None:
        if GLOO_INTERFACE_ENV not in os.environ and not is_wildcard(address):
            log.warning("found no network interface with address %s: gloo listens where it chooses (set %s to "
                        "the interface it should use)", address, GLOO_INTERFACE_ENV)
        yield
        return
    os.environ[GLOO_INTERFACE_ENV] = interface
    try:
        yield
    finally:
        del os.environ[GLOO_INTERFACE_ENV]


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` (an IP address or a host name, resolved as a socket would) as an IP address; None if unknown."""
    try:
        return ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][4][0].split("%")[0])
    except (OSError, ValueError):
        return None


def _ipv4_interfaces() -> dict[ipaddress.IPv4Address, str]:
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            found.setdefault(ipaddress.IPv4Address(raw[20:24]), name)
    return found


def _ipv6_interfaces() -> dict[ipaddress.IPv6Address, str]:
    found = {}
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                fields = line.split()
                if len(fields) == 6:
                    found.setdefault(ipaddress.IPv6Address(bytes.fromhex(fields[0])), fields[5])
    except OSError:
        pass
    return found
