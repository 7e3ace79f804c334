import pytest

from api_token_exporter.core.config import ConfigError, load_settings


def test_precedence_file_env_kwargs(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("header_name: X-Token\nrate_limits: {minute: 5}\nmax_tokens: 50\n")
    s = load_settings(str(cfg), environ={"ATE_MAX_TOKENS": "70"})
    assert s.header_name == "X-Token" and s.max_tokens == 70
    assert s.rate_limits == {"minute": 5, "hour": 1000, "day": 10000}
    s = load_settings(str(cfg), environ={"ATE_MAX_TOKENS": "70"}, max_tokens=90)
    assert s.max_tokens == 90


def test_secrets_from_files(tmp_path):
    secret = tmp_path / "ingest"
    secret.write_text("from-file\n")
    s = load_settings(environ={"ATE_INGEST_TOKEN_FILE": str(secret), "ATE_OBSERVE_ONLY": "true",
                               "ATE_RATE_LIMITS": "minute=7,day=9"})
    assert s.ingest_token == "from-file" and s.observe_only is True
    assert s.rate_limits == {"minute": 7, "hour": 1000, "day": 9}


@pytest.mark.parametrize("kwargs,message", [
    ({"rate_limits": {"week": 5}}, "unknown window 'week'"),
    ({"bogus": 1}, "unknown setting(s): bogus"),
    ({"metrics_basic_user": "u"}, "needs both user and password"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
])
def test_bad_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, **kwargs)
    assert message in str(info.value)


def test_missing_secret_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="admin_token_file .*No such file"):
        load_settings(environ={"ATE_ADMIN_TOKEN_FILE": str(tmp_path / "nope")})


@pytest.mark.parametrize("name, value, words", [
    ("ATE_OBSERVE_ONLY", "flase", "observe_only must be true or false"),
    ("ATE_MAX_TOKENS", "ten", "max_tokens must be a whole number"),
    ("ATE_PROMETHEUS_TIMEOUT", "nan", "prometheus_timeout must be a positive duration"),
    ("ATE_PROMETHEUS_TIMEOUT", "soon", "prometheus_timeout must be a duration"),
    ("ATE_METRICS_PORT", "http", "metrics_port must be a whole number"),
])
def test_a_bad_setting_stops_start_up_naming_it(name, value, words):
    with pytest.raises(ConfigError, match=words):
        load_settings(environ={name: value})


def test_durations_take_units():
    assert load_settings(environ={"ATE_PROMETHEUS_TIMEOUT": "500ms"}).prometheus_timeout == 0.5
    assert load_settings(environ={"ATE_PROMETHEUS_TIMEOUT": "2m"}).prometheus_timeout == 120
    assert load_settings(environ={"ATE_OBSERVE_ONLY": "off"}).observe_only is False
