"""docs/ stays true to the code: the catalogue, the settings, the series budget, the README."""
import dataclasses
import pathlib
import re

from api_token_exporter.config import Settings
from api_token_exporter.metrics import Metrics
from api_token_exporter.server import create_app
from conftest import build_app

ROOT = pathlib.Path(__file__).resolve().parent.parent
CATALOGUE = (ROOT / "docs" / "metrics.md").read_text()


def catalogue_names():
    return set(re.findall(r"^\| `(apitoken_[a-z_]+)` \|", CATALOGUE, re.M))


def exposed_families(text):
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def test_every_exposed_family_is_in_the_catalogue_and_back(keys):
    app_text = build_app(keys[0]).test_client().get("/metrics").get_data(as_text=True)
    # with redis:// storage (never called here) the breaker state is exposed too
    exporter_text = create_app(keys_file=keys[0], storage_uri="redis://127.0.0.1:9/0").view.render()[0].decode()
    exposed = exposed_families(app_text) | exposed_families(exporter_text)
    names = catalogue_names()
    assert exposed - names == set(), "exposed but not documented"
    assert names - exposed == set(), "documented but never exposed"


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"`{f.name}`" not in doc]
    assert missing == []


def test_series_budget_per_token_is_as_documented(keys):
    """docs/metrics.md: 44 + R*M*C per token with three windows, no LLM use, no expiry or rotation."""
    client = build_app(keys[0]).test_client()
    before = client.get("/metrics").get_data(as_text=True)
    client.get("/items", headers={"X-API-Key": keys[1]["alpha"]})
    after = client.get("/metrics").get_data(as_text=True)

    def token_series(text, token):
        return [l for l in text.splitlines() if not l.startswith("#") and f'token="{token}"' in l]

    added = len(token_series(after, "alpha")) - len(token_series(before, "alpha"))
    # info, status, status-class and created-time lines exist for every configured key from the start
    assert len(token_series(before, "alpha")) == 12
    assert len(token_series(after, "alpha")) == 45
    assert "44 + R·M·C + 4·L + B + K" in CATALOGUE and added == 33


def test_overflow_label_is_shared_across_families():
    m = Metrics(max_tokens=1)
    assert m.tokens.admit("a") == "a"
    assert m.tokens.admit("b") == "__overflow__"
    assert m.tokens.admit("__unauthenticated__") == "__unauthenticated__"


def test_readme_gives_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme
    assert "make demo" in readme


def test_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "exporter" / "api_token_exporter"
    missing = [p.stem for p in package.glob("*.py") if p.stem != "__init__" and f"`{p.stem}`" not in layout]
    assert missing == []
