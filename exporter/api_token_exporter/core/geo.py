"""Where a request comes from: the client's address behind trusted proxies, and its country.

``client_ip`` believes X-Forwarded-For only when the request arrives from a trusted proxy, and
then walks it from the right (the hop nearest to us) to the first address that is not a trusted
proxy: entries a client prepends sit to the left of that one and are never reached.

``CountryResolver`` answers an ISO 3166-1 alpha-2 code, or ``ZZ`` for an address it cannot
place (private, loopback, link-local, multicast, reserved, unallocated, unreadable). ZZ is one
of ISO 3166-1's user-assigned codes, and CLDR's "Unknown Region"; no country will ever get it.
The built-in data is iptocc's, the Regional Internet Registries' delegation statistics: the
country an address block was registered to, not where a device stands. Those statistics also
use EU for some pan-European blocks (an ISO 3166-1 exceptional reservation), and it is kept.
With ``mmdb_path`` a MaxMind-format country database answers instead (GeoLite2-Country,
DB-IP's country lite, ...).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import sys
import time
from typing import Iterable, List, Optional, Tuple, Union

from .errors import ConfigError, optional_import

UNKNOWN_COUNTRY = "ZZ"
CACHE_SIZE = 65_536
MAX_ADDRESS_LENGTH = 64     # the longest address with brackets and a port has 53 characters
_COUNTRY_CODE = re.compile(r"[A-Z]{2}")
_PORT = re.compile(r"[0-9]{1,5}")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NETWORK_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_trusted_proxies(values: Union[str, Iterable, None]) -> List[Network]:
    """The networks of the proxies whose X-Forwarded-For is believed: CIDR networks or single
    addresses; a string is read as a comma-separated list (as from an environment variable)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [part for part in values.split(",") if part.strip()]
    networks = []
    for value in values:
        if isinstance(value, _NETWORK_TYPES):
            networks.append(_unmapped_network(value))
            continue
        if not isinstance(value, str):
            raise ConfigError(f"trusted_proxies: {value!r} is not a network "
                              "(e.g. 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)")
        text = value.strip()
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: {value!r} is not a network "
                                  "(e.g. 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)") from None
            raise ConfigError(f"trusted_proxies: {value!r} has host bits set; "
                              f"did you mean {loose}?") from None
        networks.append(_unmapped_network(network))
    return networks


def _unmapped_network(network: Network) -> Network:
    """::ffff:10.0.0.0/104 as 10.0.0.0/8, since addresses are compared unmapped."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_IPV4_MAPPED):
        return ipaddress.ip_network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


@functools.lru_cache(maxsize=32)
def _parsed(trusted_proxies) -> tuple:
    return tuple(parse_trusted_proxies(trusted_proxies))


def _address(text: str) -> Optional[Address]:
    """The address in a REMOTE_ADDR or X-Forwarded-For item: IPv4 or IPv6, either one with a
    port ("1.2.3.4:5678", "[2001:db8::1]:443"); IPv4-mapped IPv6 as IPv4; None if unreadable.
    An IPv6 address without brackets is read whole: "2001:db8::1:443" has no port."""
    if text[0] == "[":
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and _PORT.fullmatch(rest, 1))):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text, port = text.split(":")
        if not _PORT.fullmatch(port):
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:                   # fe80::1%eth0: the zone names our interface, not the client
            return ipaddress.IPv6Address(int(address))
    return address


def _hop(text) -> Optional[Tuple[Address, str]]:
    """An address and its canonical text. The 4,096 read last are kept (the proxies', the busy
    clients'): parsing one costs 1-3 µs, finding it kept 0.1 µs."""
    if not isinstance(text, str) or not text or len(text) > MAX_ADDRESS_LENGTH:
        return None
    return _hop_cached(text)


@functools.lru_cache(maxsize=4096)
def _hop_cached(text: str) -> Optional[Tuple[Address, str]]:
    address = _address(text)
    return None if address is None else (address, str(address))


def _trusted(address: Address, networks) -> bool:
    for network in networks:
        if address in network:
            return True
    return False


def client_ip(environ, trusted_proxies=()) -> str:
    """The client's address of a WSGI request, in canonical form, or "" when there is none.

    Without trusted proxies (the default) X-Forwarded-For is ignored and REMOTE_ADDR is the
    client. When REMOTE_ADDR is in a trusted network, X-Forwarded-For (every header line, as
    the server joins them with commas) is walked from the right, skipping trusted addresses,
    and the first untrusted one is the client. Trust the proxies' own addresses only: a client
    inside a trusted network could otherwise name any address it likes.

    An entry that is not an address (a proxy's "unknown", a Unix socket, garbage) stops the
    walk, and the last address read is the answer: that is the peer of the trusted proxy that
    wrote the unreadable entry, the nearest hop known for certain. The same holds when every
    entry is trusted. Empty entries (from joining header lines) are skipped.

    ``trusted_proxies`` is a list of CIDR strings, parsed once per distinct list and kept, or
    the list ``parse_trusted_proxies`` returns (parse at start-up to see a bad entry early).
    """
    peer = _hop(environ.get("REMOTE_ADDR"))
    if peer is None:
        return ""
    if not trusted_proxies:
        return peer[1]
    networks = trusted_proxies
    if isinstance(networks, str) or not isinstance(next(iter(networks)), _NETWORK_TYPES):
        networks = _parsed(networks if isinstance(networks, str) else tuple(networks))
    if not _trusted(peer[0], networks):
        return peer[1]
    forwarded = environ.get("HTTP_X_FORWARDED_FOR") or ""
    for item in reversed(forwarded.split(",")):
        item = item.strip()
        if not item:
            continue
        hop = _hop(item)
        if hop is None:
            break
        peer = hop
        if not _trusted(peer[0], networks):
            break
    return peer[1]


class CountryResolver:
    """``country(ip)``: the ISO 3166-1 alpha-2 code of an address in upper case, or "ZZ".

    By default from iptocc's offline copy of the RIR delegation data; with ``mmdb_path`` from a
    MaxMind-format database (``country.iso_code``, else ``registered_country.iso_code``).
    Answers are kept in a bounded LRU cache (thread-safe) since lookups are on the request path.
    Non-public addresses are ZZ whatever a database says about them.
    """

    def __init__(self, mmdb_path: Optional[str] = None, cache_size: int = CACHE_SIZE):
        self._reader = None
        if mmdb_path is None:
            self._lookup, self.source = _iptocc_backend()
        else:
            self._reader, self.source = _open_mmdb(mmdb_path)
            self._lookup = functools.partial(_mmdb_country, self._reader,
                                             self._reader.metadata().ip_version)
        self._cached = functools.lru_cache(maxsize=cache_size)(self._resolve)

    def country(self, ip: str) -> str:
        if not isinstance(ip, str) or len(ip) > MAX_ADDRESS_LENGTH:    # nothing long enters the cache
            return UNKNOWN_COUNTRY
        return self._cached(ip)

    def cache_info(self):
        return self._cached.cache_info()

    def _resolve(self, ip: str) -> str:
        hop = _hop(ip.strip())              # client_ip has usually just read this address
        if hop is None or not hop[0].is_global or hop[0].is_multicast:
            return UNKNOWN_COUNTRY
        code = self._lookup(*hop)
        if isinstance(code, str):
            code = code.upper()
            if _COUNTRY_CODE.fullmatch(code):
                return code
        return UNKNOWN_COUNTRY

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> "CountryResolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _iptocc_backend():
    purpose = "Country lookup with the built-in data (iptocc)"
    if sys.version_info < (3, 10):
        raise ConfigError(f"{purpose} needs Python 3.10 or newer; on this Python give mmdb_path, "
                          "a MaxMind-format country database")
    iptocc = optional_import("iptocc", "geo", purpose)
    from importlib.metadata import version
    country_code = iptocc.country_code
    return (lambda address, text: country_code(text)), f"iptocc {version('iptocc')} (RIR delegation data)"


def _open_mmdb(path: str):
    maxminddb = optional_import("maxminddb", "geo", "Country lookup from a MaxMind database (mmdb_path)")
    try:
        reader = maxminddb.open_database(path)
    except FileNotFoundError:
        raise ConfigError(f"mmdb_path {path!r}: no such file") from None
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(f"mmdb_path {path!r} is not a readable MaxMind DB file: {exc}") from None
    metadata = reader.metadata()
    built = time.strftime("%Y-%m-%d", time.gmtime(metadata.build_epoch))
    return reader, f"{metadata.database_type} (MaxMind DB built {built})"


def _mmdb_country(reader, ip_version: int, address: Address, text: str) -> Optional[str]:
    if address.version == 6 and ip_version == 4:       # the reader refuses IPv6 in an IPv4 database
        return None
    record = reader.get(address)
    if not isinstance(record, dict):
        return None
    for key in ("country", "registered_country"):
        part = record.get(key)
        if isinstance(part, dict) and isinstance(part.get("iso_code"), str):
            return part["iso_code"]
    return None
