"""One grammar each: durations (core/durations.py) and timestamps (core/timestamps.py) read the
same wherever a user writes them, and settings read the same from a flat or a sectioned file."""
import dataclasses
import pathlib
import datetime as dt
import re
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from api_token_exporter.core.config import SECTIONS, ConfigError, Settings, load_settings
from api_token_exporter.core.durations import DurationError, format_duration, parse_duration, prometheus_duration
from api_token_exporter.core.keystore import add_key, load_keys
from api_token_exporter.core.timestamps import TimestampError, format_timestamp, parse_timestamp
from api_token_exporter.mixin.promql import ThresholdError, seconds
from api_token_exporter.proxy.pool import pool_from_dict
from support import CHECKOUT

ROOT = pathlib.Path(CHECKOUT)


@pytest.mark.parametrize("text, value", [
    ("90", 90), ("0.5", 0.5), ("500ms", 0.5), ("1.5s", 1.5), ("10m", 600), ("12h", 43200), ("7d", 604800),
    ("2w", 1209600), ("1h30m", 5400), ("1d12h", 129600), (" 7D ", 604800), (45, 45.0),
])
def test_durations(text, value):
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1x", "1m1h", "1h 30m", "nan", "inf", "7 d", True])
def test_not_durations(text):
    with pytest.raises(DurationError, match="duration"):
        parse_duration(text, "grace")


@given(st.integers(0, 10**7))
def test_a_formatted_duration_reads_back(total):
    assert parse_duration(format_duration(total)) == total
    assert prometheus_duration(format_duration(total)) == total


def test_what_goes_into_promql_is_a_prometheus_duration():
    assert seconds("1h30m") == 5400
    for bad in ("1.5h", "90", "7 d"):
        with pytest.raises(ThresholdError):
            seconds(bad)


def test_7d_is_a_duration_everywhere(tmp_path):
    """A setting, a pool file and a key rotation's grace all take the same grammar."""
    assert load_settings(environ={"ATE_CONSOLE_SESSION_LIFETIME": "7d"}).console_session_lifetime == 604800
    assert load_settings(environ={"ATE_STORAGE_TIMEOUT": "500ms"}).storage_timeout == 0.5
    pool = pool_from_dict({"upstream": "https://api.github.com", "provider": "github", "sync_interval": "2m",
                           "credentials": [{"id": "a", "secret_env": "T"}]}, {"T": "ghp_" + "a" * 36})
    assert pool.sync_interval == 120
    keys = str(tmp_path / "keys.yml")
    add_key(keys, "shop")
    rotated = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "keys", "rotate", "shop",
                              "--keys-file", keys, "--grace", "7d"], capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    key = load_keys(keys)[0]
    assert 7 * 86400 - 60 < (key.previous.valid_until - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 7 * 86400


@pytest.mark.parametrize("text, value", [
    ("2026-12-01", 1796083200), ("2026-12-01T08:00:00Z", 1796112000), ("2026-12-01T08:00:00+02:00", 1796104800),
    ("2026-12-01T08:00", 1796112000), ("2026-12-01 08:00:00", 1796112000), ("1796112000", 1796112000),
    ("2026-12-01T08:00:00.123456789Z", 1796112000.123456), (1796112000.5, 1796112000.5),
])
def test_timestamps(text, value):
    assert parse_timestamp(text) == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "nan", "-inf", "2026-12-01T25:00", ""])
def test_not_timestamps(text):
    with pytest.raises(TimestampError, match="until"):
        parse_timestamp(text, "until")


@given(st.integers(0, 4102444800000))
def test_a_formatted_timestamp_reads_back(milliseconds):
    text = format_timestamp(milliseconds / 1000)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
    assert round(parse_timestamp(text) * 1000) == milliseconds


# -- settings in sections ----------------------------------------------------------------------
def test_every_setting_is_in_exactly_one_section():
    named = [name for names in SECTIONS.values() for name in names]
    assert sorted(named) == sorted(f.name for f in dataclasses.fields(Settings))
    assert len(named) == len(set(named))
    assert set(SECTIONS) == {"keys", "limits", "storage", "metrics", "alerting", "analytics", "console",
                             "digests", "proxy", "serving"}


def test_a_sectioned_file_reads_as_a_flat_one(tmp_path):
    flat, sectioned = tmp_path / "flat.yml", tmp_path / "sectioned.yml"
    flat.write_text("max_tokens: 500\nstorage_timeout: 2s\nadmin_token: " + "a" * 32 + "\ndigest_top_n: 7\n")
    sectioned.write_text("metrics:\n  max_tokens: 500\nstorage:\n  storage_timeout: 2s\nkeys:\n  admin_token: "
                         + "a" * 32 + "\ndigests:\n  digest_top_n: 7\n")
    assert load_settings(str(flat), environ={}) == load_settings(str(sectioned), environ={})


def test_a_secret_file_in_its_section(tmp_path):
    (tmp_path / "admin").write_text("b" * 32 + "\n")
    (tmp_path / "s.yml").write_text(f"keys:\n  admin_token_file: {tmp_path / 'admin'}\n")
    assert load_settings(str(tmp_path / "s.yml"), environ={}).admin_token == "b" * 32


@pytest.mark.parametrize("body, message", [
    ("metrics:\n  header_name: X-Key\n", "metrics.header_name is not a setting of the metrics section (it belongs in keys)"),
    ("metrics:\n  nonsense: 1\n", "metrics.nonsense is not a setting of the metrics section"),
    ("metrics: 5\n", "metrics must be a mapping of settings"),
    ("max_tokens: 5\nmetrics:\n  max_tokens: 6\n", "max_tokens is given twice"),
])
def test_a_setting_outside_its_section_is_named(tmp_path, body, message):
    (tmp_path / "s.yml").write_text(body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(str(tmp_path / "s.yml"), environ={})


def test_the_configuration_docs_list_each_section_s_settings():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section, names in SECTIONS.items():
        part = doc.split(f"### `{section}`", 1)[1].split("\n#", 1)[0]
        documented = set(re.findall(r"^\| `(\w+)`", part, re.M)) | set(re.findall(r"^\| `\w+` / `(\w+)`", part, re.M))
        assert documented == set(names), section


def test_commands_read_settings_the_same_way(tmp_path):
    """report and prices take prometheus_url, keys_file and the price files from ATE_CONFIG, as
    digest and serve do."""
    config = tmp_path / "settings.yml"
    config.write_text("analytics:\n  prometheus_url: http://127.0.0.1:9\nmetrics:\n  pricing_file: "
                      f"{tmp_path / 'missing-pricing.yml'}\n")
    env = {"ATE_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    report = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "report", "--days", "1"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert report.returncode == 3 and "127.0.0.1:9" in report.stderr
    prices = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "prices", "show", "openai", "gpt-4o"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert prices.returncode == 2 and "missing-pricing.yml" in prices.stderr
    bad = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "report", "--days", "1"],
                         capture_output=True, text=True, timeout=60, env=dict(env, ATE_STORAGE_TIMEOUT="soon"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: storage_timeout must be a duration")
