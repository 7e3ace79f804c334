"""geo: the client's address behind trusted proxies (the rightmost untrusted X-Forwarded-For
hop) and its country, from iptocc's RIR data or a MaxMind DB written here; real packages."""
import ipaddress
import subprocess
import sys
import textwrap
import threading

import maxminddb
import pytest
from hypothesis import given, strategies as st
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from api_token_exporter.core.config import ConfigError
from api_token_exporter.core.geo import (CountryResolver, UNKNOWN_COUNTRY, client_ip,
                                    parse_trusted_proxies)

PROXIES = ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]


def request(remote_addr, forwarded=None):
    environ = {"REMOTE_ADDR": remote_addr}
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    return environ


# -- client_ip ------------------------------------------------------------------------------

def test_without_trusted_proxies_the_peer_is_the_client_and_the_header_is_ignored():
    assert client_ip(request("198.51.100.9", "203.0.113.5")) == "198.51.100.9"
    assert client_ip(request("10.0.0.1", "203.0.113.5")) == "10.0.0.1"


def test_an_untrusted_peer_is_the_client_whatever_it_forwards():
    assert client_ip(request("198.51.100.9", "203.0.113.5, 10.0.0.2"), PROXIES) == "198.51.100.9"


def test_entries_a_client_prepends_are_never_reached():
    # the client sent "X-Forwarded-For: 6.6.6.6, 10.9.9.9"; our proxy appended the client's address
    assert client_ip(request("10.0.0.1", "6.6.6.6, 10.9.9.9, 203.0.113.5"), PROXIES) == "203.0.113.5"


def test_a_chain_of_trusted_proxies_is_walked_from_the_right():
    forwarded = "6.6.6.6, 203.0.113.5, 172.16.4.4, 10.0.0.3"
    assert client_ip(request("10.0.0.1", forwarded), ["10.0.0.0/8", "172.16.0.0/12"]) == "203.0.113.5"
    assert client_ip(request("10.0.0.1", forwarded), ["10.0.0.0/8"]) == "172.16.4.4"


def test_every_header_line_counts_and_empty_items_are_skipped():
    # a server joins repeated X-Forwarded-For lines with commas; an empty line leaves an empty item
    assert client_ip(request("10.0.0.1", "203.0.113.5,, 10.0.0.2 ,"), PROXIES) == "203.0.113.5"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client():
    assert client_ip(request("10.0.0.1", "10.0.0.7, 10.0.0.2"), PROXIES) == "10.0.0.7"
    assert client_ip(request("10.0.0.1"), PROXIES) == "10.0.0.1"
    assert client_ip(request("10.0.0.1", ""), PROXIES) == "10.0.0.1"


@pytest.mark.parametrize("forwarded, expected", [
    ("203.0.113.5, unknown, 10.0.0.2", "10.0.0.2"),      # stops at the unreadable item
    ("203.0.113.5, 10.0.0.2, 1.2.3", "10.0.0.1"),        # the nearest item is unreadable: the peer
    ("203.0.113.5, 10.0.0.2, unix:", "10.0.0.1"),
    ('"203.0.113.5"', "10.0.0.1"),
    ("203.0.113.5, 01.2.3.4", "10.0.0.1"),               # leading zeros are ambiguous: refused
    ("203.0.113.5, 1.2.3.4:http", "10.0.0.1"),
    ("203.0.113.5, [2001:db8::1", "10.0.0.1"),
    ("203.0.113.5, [2001:db8::1]:x", "10.0.0.1"),
    ("203.0.113.5, " + "1" * 100, "10.0.0.1"),
])
def test_a_malformed_item_stops_the_walk_at_the_last_address_read(forwarded, expected):
    assert client_ip(request("10.0.0.1", forwarded), PROXIES) == expected


@pytest.mark.parametrize("forwarded, expected", [
    ("203.0.113.5:5678", "203.0.113.5"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),             # canonical form
    ("2001:db8::1:443", "2001:db8::1:443"),              # no brackets: all of it is the address
    ("::ffff:203.0.113.5", "203.0.113.5"),               # IPv4-mapped: the IPv4 address
    ("[::ffff:203.0.113.5]:80", "203.0.113.5"),
    ("fe80::1%eth0", "fe80::1"),                         # the zone is ours, not the client's
])
def test_ports_ipv6_and_mapped_addresses(forwarded, expected):
    assert client_ip(request("::1", forwarded), PROXIES) == expected


def test_a_mapped_peer_matches_an_ipv4_network_and_a_mapped_network_an_ipv4_peer():
    assert client_ip(request("::ffff:10.0.0.1", "203.0.113.5"), ["10.0.0.0/8"]) == "203.0.113.5"
    assert client_ip(request("10.0.0.1", "203.0.113.5"), ["::ffff:10.0.0.0/104"]) == "203.0.113.5"
    assert client_ip(request("::ffff:198.51.100.9")) == "198.51.100.9"


@pytest.mark.parametrize("environ", [{}, {"REMOTE_ADDR": ""}, {"REMOTE_ADDR": None},
                                     {"REMOTE_ADDR": "unix:/run/app.sock"}, {"REMOTE_ADDR": "localhost"}])
def test_no_usable_peer_address_is_an_empty_answer(environ):
    assert client_ip(dict(environ, HTTP_X_FORWARDED_FOR="203.0.113.5"), PROXIES) == ""


def test_parsed_networks_and_strings_give_the_same_answers():
    networks = parse_trusted_proxies(PROXIES)
    for environ in (request("10.0.0.1", "6.6.6.6, 203.0.113.5"), request("::1", "[2001:db8::1]:443"),
                    request("198.51.100.9", "203.0.113.5")):
        assert client_ip(environ, networks) == client_ip(environ, PROXIES) == client_ip(environ, tuple(PROXIES))


def test_parse_trusted_proxies():
    assert parse_trusted_proxies(None) == [] and parse_trusted_proxies([]) == []
    assert parse_trusted_proxies(" 10.0.0.0/8, ::1 ,127.0.0.1,") == [
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"), ipaddress.ip_network("127.0.0.1/32")]
    assert parse_trusted_proxies(["::ffff:10.0.0.0/104"]) == [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize("entry, message", [
    ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
    ("proxy.internal", "'proxy.internal' is not a network"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not a network"),
    ("", "'' is not a network"),
    (42, "42 is not a network"),
])
def test_a_bad_trusted_proxy_is_named(entry, message):
    with pytest.raises(ValueError) as err:
        parse_trusted_proxies(["127.0.0.1", entry])
    assert isinstance(err.value, ConfigError) and message in str(err.value)


forwarded_items = st.one_of(st.ip_addresses().map(str), st.text(max_size=50),
                            st.sampled_from(["unknown", "", " ", "[::1]:80", "10.0.0.9"]))


@given(prepended=st.lists(forwarded_items, max_size=6), client=st.ip_addresses(),
       proxies=st.lists(st.sampled_from(["10.0.0.2", "10.1.2.3", "127.0.0.1"]), max_size=3))
def test_whatever_a_client_prepends_it_is_the_address_the_first_proxy_saw(prepended, client, proxies):
    if client.version == 6 and client.ipv4_mapped:
        client = client.ipv4_mapped
    if any(client in ipaddress.ip_network(n) for n in PROXIES):
        return                              # a client inside a trusted network is a proxy to us
    forwarded = ", ".join(prepended + [str(client)] + proxies)
    assert client_ip(request("10.0.0.1", forwarded), PROXIES) == str(client)


@given(st.text(max_size=200), st.text(max_size=60))
def test_client_ip_answers_an_address_or_nothing_for_any_input(forwarded, remote_addr):
    answer = client_ip(request(remote_addr, forwarded), PROXIES)
    assert answer == "" or str(ipaddress.ip_address(answer)) == answer


# -- CountryResolver: iptocc ----------------------------------------------------------------

@pytest.fixture(scope="module")
def resolver():
    return CountryResolver()


# Lines of the RIRs' delegated-*-extended files, as iptocc's repository keeps them (data/, read
# 2026-06-27) and builds its tables from; registry|country|type|start|count|date|status|holder.
# The lines were chosen, and the codes checked against iptocc 3.3.170, not remembered.
DELEGATIONS = [
    "apnic|JP|ipv4|1.0.16.0|4096|20110412|allocated|A92D9378",   # iptocc's README example, 1.0.16.1
    "apnic|CN|ipv4|14.16.0.0|1048576|20100906|allocated|A92319D5",
    "lacnic|AR|ipv4|24.232.0.0|65536|19970602|allocated|20118",
    "lacnic|VE|ipv4|190.200.0.0|524288|20070613|allocated|20862",
]


@pytest.mark.parametrize("line", DELEGATIONS)
def test_both_ends_of_a_delegated_block_resolve_to_its_country(resolver, line):
    _, country, _, start, count = line.split("|")[:5]
    first = ipaddress.IPv4Address(start)
    last = first + int(count) - 1
    assert resolver.country(str(first)) == resolver.country(str(last)) == country
    assert resolver.country(f"::ffff:{first + 1}") == resolver.country(f"{last - 1}:443") == country


@pytest.mark.parametrize("ip, country", [
    ("8.8.8.8", "US"), ("2001:4860:4860::8888", "US"),       # Google Public DNS, ARIN-registered
])
def test_well_known_public_addresses(resolver, ip, country):
    assert resolver.country(ip) == country


@pytest.mark.parametrize("ip", [
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "::1", "169.254.1.1", "fe80::1%eth0",
    "fc00::1", "100.64.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1", "ff02::1", "240.0.0.1",
    "192.0.2.1", "2001:db8::1", "::ffff:10.0.0.1", "::",
])
def test_private_loopback_and_reserved_addresses_are_unknown(resolver, ip):
    assert resolver.country(ip) == UNKNOWN_COUNTRY == "ZZ"


@pytest.mark.parametrize("ip", ["", "x", "1.2.3", "8.8.8.8.8", " ", "8.8.8.8/32", "[8.8.8.8", "١.٢.٣.٤",
                                "8" * 1000, None, 134744072, b"8.8.8.8"])
def test_unreadable_input_is_unknown(resolver, ip):
    assert resolver.country(ip) == "ZZ"


def test_long_input_never_enters_the_cache():
    resolver = CountryResolver(cache_size=8)
    assert resolver.country("8" * 65) == resolver.country("x" * 10_000) == "ZZ"
    assert resolver.cache_info().currsize == 0
    assert resolver.country("8.8.8.8") == "US" and resolver.cache_info().currsize == 1


def test_the_resolver_says_where_its_data_comes_from(resolver):
    assert resolver.source.startswith("iptocc 3.") and "RIR" in resolver.source


def test_lookups_from_many_threads_agree(resolver):
    addresses = [f"{a}.{b}.7.9" for a in range(1, 224, 3) for b in range(0, 256, 37)]
    expected = [resolver.country(ip) for ip in addresses]
    shared, results = CountryResolver(cache_size=50), {}

    def run(n):
        results[n] = [shared.country(ip) for ip in addresses * 3]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(answer == expected * 3 for answer in results.values())
    assert shared.cache_info().currsize == 50


@pytest.fixture(scope="module")
def small_cache():
    return CountryResolver(cache_size=64)


@given(st.one_of(st.ip_addresses().map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
                 st.text(max_size=80)))
def test_any_input_gives_two_upper_case_letters_and_the_cache_stays_bounded(small_cache, ip):
    code = small_cache.country(ip)
    assert len(code) == 2 and code.isascii() and code.isalpha() and code.isupper()
    assert small_cache.cache_info().currsize <= 64


# -- CountryResolver: a MaxMind DB --------------------------------------------------------

MMDB_RECORDS = [   # network, record as a MaxMind country database holds it
    ("1.2.3.0/24", {"country": {"iso_code": "SE", "names": {"en": "Sweden"}},
                    "registered_country": {"iso_code": "FI"}}),
    ("5.6.0.0/16", {"registered_country": {"iso_code": "de"}}),           # no country: the registrant's
    ("2a02:1200::/32", {"country": {"iso_code": "FR"}}),
    ("9.9.9.0/24", {"country": {"geoname_id": 2635167}}),                 # no code
    ("8.8.8.0/24", {"country": {"iso_code": "USA"}}),                     # not alpha-2
    ("7.7.7.0/24", "not a record"),
    ("10.0.0.0/8", {"country": {"iso_code": "US"}}),                      # private whatever it says
    ("224.0.0.0/4", {"country": {"iso_code": "US"}}),                     # multicast, the same
]


@pytest.fixture(scope="module")
def mmdb_path(tmp_path_factory):
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="Test-Country")
    for network, record in MMDB_RECORDS:
        writer.insert_network(IPSet([network]), record)
    path = tmp_path_factory.mktemp("mmdb") / "test-country.mmdb"
    writer.to_db_file(str(path))
    return str(path)


def test_the_written_database_reads_back_as_written(mmdb_path):
    with maxminddb.open_database(mmdb_path) as reader:
        for network, record in MMDB_RECORDS:
            assert reader.get(str(ipaddress.ip_network(network)[1])) == record


@pytest.mark.parametrize("ip, country", [
    ("1.2.3.4", "SE"), ("::ffff:1.2.3.4", "SE"), ("1.2.3.4:8080", "SE"),
    ("5.6.7.8", "DE"), ("2a02:1200::1", "FR"), ("[2a02:1200:ffff::1]:443", "FR"),
    ("9.9.9.9", "ZZ"), ("8.8.8.8", "ZZ"), ("7.7.7.7", "ZZ"), ("10.1.2.3", "ZZ"), ("239.1.2.3", "ZZ"),
    ("4.4.4.4", "ZZ"), ("2a03::1", "ZZ"), ("garbage", "ZZ"),
])
def test_a_maxmind_database_answers_with_mmdb_path(mmdb_path, ip, country):
    with CountryResolver(mmdb_path=mmdb_path) as resolver:
        assert resolver.country(ip) == country
        assert resolver.source.startswith("Test-Country (MaxMind DB built ")


def test_an_ipv4_only_database_answers_ipv6_with_unknown(tmp_path):
    writer = MMDBWriter(ip_version=4, database_type="Test-Country-IPv4")
    writer.insert_network(IPSet(["1.2.3.0/24"]), {"country": {"iso_code": "SE"}})
    writer.to_db_file(str(tmp_path / "v4.mmdb"))
    with CountryResolver(mmdb_path=str(tmp_path / "v4.mmdb")) as resolver:
        assert resolver.country("1.2.3.4") == "SE"
        assert resolver.country("2a02:1200::1") == "ZZ"


def test_a_missing_or_unreadable_database_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"mmdb_path '.*nowhere.mmdb': no such file"):
        CountryResolver(mmdb_path=str(tmp_path / "nowhere.mmdb"))
    (tmp_path / "text.mmdb").write_text("not a database\n")
    with pytest.raises(ConfigError, match=r"mmdb_path '.*text.mmdb' is not a readable MaxMind DB file"):
        CountryResolver(mmdb_path=str(tmp_path / "text.mmdb"))


# -- without the geo extra ------------------------------------------------------------------

WITHOUT_GEO = textwrap.dedent("""
    import importlib.abc, sys
    class Missing(importlib.abc.MetaPathFinder):          # as if the geo extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("iptocc", "maxminddb"):
                raise ImportError(f"No module named {name!r}")
    sys.meta_path.insert(0, Missing())

    from api_token_exporter.core import geo
    from api_token_exporter.core.config import ConfigError
    print(geo.client_ip({"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.5"}, ["10.0.0.0/8"]))
    for kwargs in ({}, {"mmdb_path": "GeoLite2-Country.mmdb"}):
        try:
            geo.CountryResolver(**kwargs)
        except ConfigError as exc:
            print("refused:", exc)
        else:
            raise SystemExit(f"CountryResolver({kwargs}) started without its extra")
""")


def test_without_the_geo_extra_the_resolver_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", WITHOUT_GEO], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "203.0.113.5"                    # client_ip needs nothing beyond the core
    assert lines[1] == ("refused: Country lookup with the built-in data (iptocc) needs the Python package "
                        "'iptocc': pip install 'api-token-exporter[geo]'")
    assert lines[2] == ("refused: Country lookup from a MaxMind database (mmdb_path) needs the Python "
                        "package 'maxminddb': pip install 'api-token-exporter[geo]'")
