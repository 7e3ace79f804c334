"""The cost per call of finding where a request comes from, on random public addresses (80 %
IPv4, 20 % IPv6): iptocc alone (the anchor); CountryResolver on it with every address new (a
miss: parse, public check, lookup, cache insert, evictions once the cache is full) and with 1,000
addresses seen before (a hit); the same for a MaxMind DB (a synthetic one written with
mmdb-writer, or yours with --mmdb) against maxminddb alone; client_ip without and with trusted
proxies (it keeps the 4,096 addresses it read last); and the two together, as the request path
will call them. With fewer than 4,096 lookups client_ip's "new" addresses are not all new.

    python benchmarks/bench_geo.py [--lookups 200000] [--rounds 5] [--networks 20000] [--mmdb PATH]
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import random
import statistics
import sys
import tempfile
import time

import iptocc
import maxminddb

from api_token_exporter.core.geo import CACHE_SIZE, CountryResolver, client_ip, parse_trusted_proxies

COUNTRIES = ["US", "DE", "JP", "BR", "IN", "FR", "GB", "CN", "NG", "AU"]


def public_addresses(n: int, rnd: random.Random) -> list:
    out = []
    while len(out) < n:
        if rnd.random() < 0.8:
            address = ipaddress.IPv4Address(rnd.getrandbits(32))
        else:                                        # inside 2000::/4, where the RIRs delegate
            address = ipaddress.IPv6Address((0x2 << 124) | rnd.getrandbits(124))
        if address.is_global and not address.is_multicast:
            out.append(str(address))
    return out


def write_mmdb(path: str, networks: int, rnd: random.Random) -> None:
    """Covers IPv4 and 2000::/4 with about ``networks`` blocks of random countries, so that
    nearly every lookup finds a record, as with a real country database."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="Synthetic-Country")
    blocks = {code: [] for code in COUNTRIES}
    v4_bits = max(1, round(math.log2(networks * 0.8)))
    for n in range(2 ** v4_bits):
        blocks[rnd.choice(COUNTRIES)].append(f"{ipaddress.IPv4Address(n << (32 - v4_bits))}/{v4_bits}")
    v6_bits = max(1, round(math.log2(networks * 0.2)))
    for n in range(2 ** v6_bits):
        start = ipaddress.IPv6Address((0x2 << 124) | (n << (124 - v6_bits)))
        blocks[rnd.choice(COUNTRIES)].append(f"{start}/{4 + v6_bits}")
    for code, cidrs in blocks.items():
        writer.insert_network(IPSet(cidrs), {"country": {"iso_code": code}, "registered_country": {"iso_code": code}})
    writer.to_db_file(path)


def per_call(fn, addresses: list, rounds: int, before=None) -> float:
    """Median over rounds of the seconds per call; ``before`` makes a fresh state per round."""
    times = []
    for _ in range(rounds):
        target = before() if before else fn
        start = time.perf_counter()
        for ip in addresses:
            target(ip)
        times.append((time.perf_counter() - start) / len(addresses))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lookups", type=int, default=200_000, help="distinct addresses per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--networks", type=int, default=20_000, help="networks in the synthetic MMDB")
    parser.add_argument("--mmdb", help="a MaxMind-format country database instead of the synthetic one")
    args = parser.parse_args()
    rnd = random.Random(1)
    fresh = public_addresses(args.lookups, rnd)
    hot = fresh[:1000] * max(1, args.lookups // 1000)
    rows = []

    def row(name, seconds):
        rows.append((name, seconds * 1e6, 1 / seconds))

    row("iptocc.country_code alone", per_call(iptocc.country_code, fresh, args.rounds))
    row("CountryResolver (iptocc), every address new",
        per_call(None, fresh, args.rounds, before=lambda: CountryResolver().country))
    warm = CountryResolver()
    for ip in hot[:1000]:
        warm.country(ip)
    row("CountryResolver (iptocc), addresses seen before", per_call(warm.country, hot, args.rounds))

    with tempfile.TemporaryDirectory() as tmp:
        path = args.mmdb
        if path is None:
            path = os.path.join(tmp, "synthetic.mmdb")
            write_mmdb(path, args.networks, rnd)
        with maxminddb.open_database(path) as reader:
            row(f"maxminddb Reader.get alone ({reader.metadata().node_count:,} nodes)",
                per_call(reader.get, fresh, args.rounds))
        resolvers = []

        def new_resolver():
            resolvers.append(CountryResolver(mmdb_path=path))
            return resolvers[-1].country
        row("CountryResolver (MaxMind DB), every address new", per_call(None, fresh, args.rounds, before=new_resolver))
        with CountryResolver(mmdb_path=path) as warm_mmdb:
            for ip in hot[:1000]:
                warm_mmdb.country(ip)
            row("CountryResolver (MaxMind DB), addresses seen before", per_call(warm_mmdb.country, hot, args.rounds))
            found = sum(warm_mmdb.country(ip) != "ZZ" for ip in fresh[:10_000]) / len(fresh[:10_000])
        for resolver in resolvers:
            resolver.close()

    proxies = parse_trusted_proxies(["10.0.0.0/8", "127.0.0.1"])
    for addresses, seen in ((fresh, "every address new"), (hot, "addresses seen before")):
        direct = [{"REMOTE_ADDR": ip} for ip in addresses]
        behind = [{"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": f"6.6.6.6, {ip}, 10.0.0.2"} for ip in addresses]
        if addresses is hot:
            for environ in direct[:1000] + behind[:1000]:
                client_ip(environ, proxies)
        row(f"client_ip, no trusted proxies, {seen}", per_call(client_ip, direct, args.rounds))
        row(f"client_ip, 2 trusted networks, 3 X-Forwarded-For items, {seen}",
            per_call(lambda e: client_ip(e, proxies), behind, args.rounds))
    fresh_requests = [{"REMOTE_ADDR": ip} for ip in fresh]
    row("client_ip then country (iptocc), every client new",
        per_call(None, fresh_requests, args.rounds, before=lambda: (lambda e, c=CountryResolver().country: c(client_ip(e)))))
    hot_requests = [{"REMOTE_ADDR": ip} for ip in hot]
    row("client_ip then country (iptocc), clients seen before",
        per_call(lambda e: warm.country(client_ip(e)), hot_requests, args.rounds))

    print(f"{args.lookups:,} random public addresses per round, median of {args.rounds} rounds; cache "
          f"{CACHE_SIZE:,} entries; {found:.0%} of them in the MaxMind DB; Python "
          f"{sys.version.split()[0]}, iptocc {warm.source.split()[1]}\n")
    print("| path | µs per call | calls per second |")
    print("|---|---:|---:|")
    for name, micros, rate in rows:
        print(f"| {name} | {micros:.2f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
