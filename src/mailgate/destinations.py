"""Where mail server settings may make mailgate connect: the destination policy.

A tenant's admin is untrusted, and a mail server's host, token URL, authority and Graph endpoint
are places mailgate connects to on the tenant's word. Without a policy, a tenant could point them
at the operator's own network (loopback, private ranges, 169.254.169.254 and other cloud metadata
services) and read what answers through the test e-mail. So every name is resolved first, each
address is checked, and mailgate connects only to an address it checked — never to the name
again, which a rebinding DNS server could answer differently the second time.

An address is *public* when it is globally routable (not loopback, private, shared, link-local,
multicast, reserved or unspecified; IPv4 inside IPv6 is judged as IPv4). Public addresses are
always allowed; the operator names what else each kind of server may reach:

    MAILGATE_TENANT_NETWORKS   default ""                  tenants' own mail servers
    MAILGATE_GLOBAL_NETWORKS   default "loopback,private"  the global server (the operator's own)

Each is a comma-separated list of CIDR networks (`10.8.0.0/16`, `fd00::/8`, `192.0.2.7`) and the
words `loopback`, `private`, `link-local` and `any`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DeliveryError, SettingsError

if TYPE_CHECKING:
    from .diagnostics.catalogue import Explanation

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_WORDS: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "any": ("0.0.0.0/0", "::/0"),
}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
GLOBAL = "global"


class DestinationRefused(DeliveryError):
    """The settings point at an address the destination policy does not allow. Never transient:
    only new settings (or the operator's policy) change it."""

    transient = False

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(message)
        self.setting = setting

    @property
    def explanation(self) -> Explanation:
        """Its cause and fix, for the test e-mail, the attempt log and a broken server's reason."""
        from .diagnostics.catalogue import Explanation

        return Explanation(
            self.message,
            "Give the mail server's public host name or address (and the token endpoint's or Graph's public URL). "
            f"If it is meant to be on a network of the operator's, the operator allows that network in {self.setting}.",
        )


def parse_networks(value: str, *, setting: str = "networks") -> tuple[Network, ...]:
    """`value` (CIDRs and words, comma- or space-separated) as networks; SettingsError otherwise."""
    networks: list[Network] = []
    problems = []
    for item in value.replace(",", " ").split():
        word = item.lower()
        try:
            if word in _WORDS:
                networks += [ipaddress.ip_network(n) for n in _WORDS[word]]
            else:
                networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            problems.append(
                (setting, f"{item!r} is neither a network (10.8.0.0/16, fd00::/8) nor one of: {', '.join(_WORDS)}")
            )
    if problems:
        raise SettingsError(problems)
    return tuple(networks)


def _plain(ip: Address) -> Address:
    """IPv4 carried in IPv6 (mapped, NAT64's well-known prefix, or 6to4's 2002:V4ADDR::/48, which
    a host with a 6to4 interface sends to that IPv4 address) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def is_public(ip: Address) -> bool:
    ip = _plain(ip)
    # fec0::/10 (site-local) is deprecated, not global: some networks still route it inside.
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or site_local
    )


def kind_of(ip: Address) -> str:
    """What an address is, in words an admin understands."""
    ip = _plain(ip)
    if ip.is_unspecified:
        return "an unspecified address (this host)"
    if ip.is_loopback:
        return "a loopback address (mailgate's own machine)"
    if ip.is_link_local:
        return "a link-local address (e.g. a cloud metadata service)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or ip in ipaddress.IPv4Network("100.64.0.0/10"):
        return "a private network address"
    return "not a public address"


@dataclass(frozen=True)
class DestinationPolicy:
    """What one kind of server ("tenant" or "global") may connect to: public addresses, and
    `allowed`. `setting` names the variable that widens it, for the error message."""

    kind: str
    allowed: tuple[Network, ...] = ()
    setting: str = "MAILGATE_TENANT_NETWORKS"

    def permits(self, ip: Address) -> bool:
        plain = _plain(ip)
        return is_public(plain) or any(plain in n or ip in n for n in self.allowed)

    def refusal(self, host: str, ip: Address) -> str:
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            where = host
        except ValueError:
            where = f"{host} ({ip})"
        server = "a tenant's mail server settings" if self.kind != GLOBAL else "the global mail server's settings"
        return (
            f"{where} is {kind_of(ip)}, where {server} may not point: mailgate connects only to public addresses "
            f"and to the networks the operator allows ({self.setting})"
        )

    def check_address(self, host: str, address: str) -> Address:
        """The address as an IP if the policy permits it, else DestinationRefused."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not self.permits(ip):
            raise DestinationRefused(self.refusal(host, ip), setting=self.setting)
        return ip

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` to connect to, in the resolver's order; each one checked.

        Raises DestinationRefused when any address of the name is refused (a name that also
        points inside the operator's network is not used at all: which address a client picks is
        not ours to guess), and OSError (socket.gaierror) when the name does not resolve. The
        caller bounds the time (its connect timeout)."""
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            ip = None
        if ip is not None:
            return [str(self.check_address(host, host))]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError:  # not a name the resolver can encode ("a..b"): as one that doesn't resolve
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r} is not a valid domain name") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        return [str(self.check_address(host, a)) for a in addresses]


@dataclass(frozen=True)
class Destinations:
    """The policy for each kind of server: the global server's (the operator's own) and tenants'."""

    tenant: DestinationPolicy = DestinationPolicy("tenant")
    global_: DestinationPolicy = DestinationPolicy(
        GLOBAL, parse_networks("loopback,private"), "MAILGATE_GLOBAL_NETWORKS"
    )

    @classmethod
    def from_settings(cls, tenant_networks: str, global_networks: str) -> Destinations:
        return cls(
            DestinationPolicy("tenant", parse_networks(tenant_networks, setting="tenant_networks"),
                              "MAILGATE_TENANT_NETWORKS"),
            DestinationPolicy(GLOBAL, parse_networks(global_networks, setting="global_networks"),
                              "MAILGATE_GLOBAL_NETWORKS"),
        )  # fmt: skip

    def for_scope(self, scope: str | None) -> DestinationPolicy:
        """The policy of a server by its scope: "global", or a tenant's id (anything else)."""
        return self.global_ if scope == GLOBAL else self.tenant


def host_of(url: str | None) -> str | None:
    """The host name of a URL (None for None or a URL without one)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname if url else None
    except ValueError:
        return None
