"""Alert settings without servers: validation names the field and changes nothing; a good
change re-renders the rules and rewrites Alertmanager's receivers (the reload is tested on the
real binaries in test_alert_api_e2e)."""
import os

import pytest
import yaml

from api_token_exporter.mixin import rules as rulegen, thresholds
from api_token_exporter.alerting.settings import AlertSettings, ApplyError, SettingsError
from api_token_exporter.alerting.store import AlertHistory
from api_token_exporter.alerting.client import UpstreamError
from devstack.stack import ALERTMANAGER_YML, ROOT, alertmanager_config

THRESHOLDS = os.path.join(ROOT, "prometheus", "thresholds.yml")


class Reloads:
    def __init__(self, refuse=False):
        self.calls, self.refuse = 0, refuse

    def reload(self):
        self.calls += 1
        if self.refuse and self.calls == 1:
            raise UpstreamError("Prometheus answered 500 to POST /-/reload: bad rule")


@pytest.fixture
def setup(tmp_path):
    rules = tmp_path / "rules"
    rulegen.write(thresholds.load_thresholds(THRESHOLDS), str(rules))
    am_file = tmp_path / "alertmanager.yml"
    am_file.write_text(yaml.safe_dump(alertmanager_config("127.0.0.1:25", "http://127.0.0.1:1", str(tmp_path / "s"),
                                                          source=ALERTMANAGER_YML)))
    history = AlertHistory(f"sqlite:///{tmp_path / 'alerts.db'}")
    prom, am = Reloads(), Reloads()
    settings = AlertSettings(history, THRESHOLDS, str(rules), prom, str(am_file), am)
    yield settings, rules, am_file, prom, am
    history.close()


def snapshot(*paths):
    return {str(p): p.read_text() for path in paths for p in ([path] if path.is_file() else sorted(path.glob("*")))}


def test_current_settings_are_the_thresholds_and_the_receivers(setup):
    settings = setup[0]
    current = settings.current()
    assert current["alert_thresholds"]["response_time"] == {"warning": 1.0, "critical": 2.0}
    assert current["alert_thresholds"]["unauthorized_access"] == {"critical": 5, "api_wide_warning": 100}
    assert current["anomaly"] == {"sensitivity": "medium", "learning_period": "1d"}
    assert current["channels"] == {"critical": ["email", "slack", "webhook"], "warning": ["slack", "webhook"]}
    assert current["recipients"] == {"email": ["api-oncall@example.com"], "slack_channel": "#api-alerts"}
    assert current["updated_by"] is None


@pytest.mark.parametrize("body,message", [
    ({"alert_thresholds": {"error_rate": {"critical": 1.5}}}, "alert_thresholds.error_rate.critical must be from"),
    ({"alert_thresholds": {"error_rate": {"warning": True}}}, "alert_thresholds.error_rate.warning must be a number"),
    ({"alert_thresholds": {"usage_spike": {"warning": 4}}},
     "alert_thresholds.usage_spike.warning must be below alert_thresholds.usage_spike.critical"),
    ({"alert_thresholds": {"unauthorized_access": {"critical": 2.5}}}, "must be a whole number"),
    ({"anomaly": {"learning_period": "5m"}}, "anomaly.learning_period must be from 1d to 90d"),
    ({"anomaly": {"learning_period": "a week"}}, "anomaly.learning_period must be a duration"),
    ({"alerts": {"x": 1}}, "alerts.x is not a setting"),
    ({"channels": {"info": ["webhook"]}}, "channels.info: severities are critical, warning"),
    ({"channels": {"warning": "slack"}}, "channels.warning must be a list"),
    ({"recipients": {"email": []}}, "recipients.email must be a non-empty list"),
    ({"recipients": {"slack_channel": "api alerts"}}, "recipients.slack_channel must look like"),
    ({"recipients": {"pager": "x"}}, "recipients has email"),
    ([1, 2], "settings must be a JSON object"),
])
def test_a_bad_value_names_the_field_and_changes_nothing(setup, body, message):
    settings, rules, am_file, prom, am = setup
    before = snapshot(rules, am_file)
    with pytest.raises(SettingsError) as refused:
        settings.update(body, "admin")
    assert message in str(refused.value)
    assert snapshot(rules, am_file) == before and prom.calls == am.calls == 0
    assert settings.history.get_settings() is None


def test_a_good_change_renders_reloads_and_persists(setup):
    settings, rules, am_file, prom, am = setup
    after = settings.update({"alert_thresholds": {"error_rate": {"warning": 0.02}},
                             "channels": {"critical": ["email", "webhook"]},
                             "recipients": {"email": ["a@example.com", "b@example.com"]}}, "admin (ana)")
    assert after["alert_thresholds"]["error_rate"] == {"warning": 0.02, "critical": 0.1}
    assert "token:apitoken_request_errors:ratio_rate5m > 0.02" in (rules / "apitoken-alerts.yml").read_text()
    assert rulegen.stale(thresholds.load_thresholds(THRESHOLDS, {"error_rate": {"warning": 0.02}}), str(rules)) == []
    receivers = {r["name"]: r for r in yaml.safe_load(am_file.read_text())["receivers"]}
    assert "slack_configs" not in receivers["critical"] and receivers["critical"]["email_configs"][0]["to"] == \
        "a@example.com, b@example.com"
    assert receivers["warning"]["slack_configs"]          # untouched
    assert prom.calls == 1 and am.calls == 1
    # a second change keeps the first (a partial PUT), and slack comes back from the stored copy
    again = settings.update({"channels": {"critical": ["email", "slack", "webhook"]}}, "admin")
    assert again["alert_thresholds"]["error_rate"]["warning"] == 0.02
    assert again["channels"]["critical"] == ["email", "slack", "webhook"]
    # nothing to do when the files already say it
    assert settings.converge() is False


def test_a_refused_reload_puts_the_previous_rules_back(setup):
    settings, rules, am_file, _prom, am = setup
    settings.prometheus = Reloads(refuse=True)
    before = snapshot(rules)
    with pytest.raises(ApplyError):
        settings.update({"alert_thresholds": {"response_time": {"warning": 0.5}}}, "admin")
    assert snapshot(rules) == before and settings.history.get_settings() is None


def test_converge_puts_stored_settings_back_in_force(setup):
    settings, rules, _am_file, prom, _am = setup
    settings.update({"anomaly": {"sensitivity": "high"}}, "admin")
    rulegen.write(thresholds.load_thresholds(THRESHOLDS), str(rules))      # a redeploy brings the defaults
    assert settings.converge() is True and prom.calls == 2
    assert rulegen.stale(thresholds.load_thresholds(THRESHOLDS, {"anomaly": {"sensitivity": "high"}}), str(rules)) == []


def test_thresholds_need_a_rules_directory(setup, tmp_path):
    settings = AlertSettings(setup[0].history, THRESHOLDS, None, None)
    with pytest.raises(SettingsError, match="need alert_rules_dir"):
        settings.update({"alert_thresholds": {"response_time": {"warning": 0.5}}}, "admin")
    with pytest.raises(SettingsError, match="need alertmanager_config_file"):
        settings.update({"channels": {"warning": ["webhook"]}}, "admin")
