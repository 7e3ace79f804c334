"""docs/ stays true to the code: the catalogue, the settings, the series budget, the README."""
import dataclasses
import pathlib
import re

import yaml
from flask import Flask, jsonify

from api_token_exporter import TokenAnalytics
from api_token_exporter.core.config import Settings
from api_token_exporter.core.keystore import add_key
from api_token_exporter.core.usage import validate_usage
from api_token_exporter.core.metrics import Metrics
from api_token_exporter.web.server import create_app
from support import build_app

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


def token_series(text, token):
    return [l for l in text.splitlines() if not l.startswith("#") and f'token="{token}"' in l]


def test_series_budget_per_token_is_as_documented(keys):
    """docs/metrics.md: 18 + R*M*C per token with three windows on the default limits, no LLM
    use, no expiry or rotation."""
    client = build_app(keys[0]).test_client()
    before = client.get("/metrics").get_data(as_text=True)
    client.get("/items", headers={"X-API-Key": keys[1]["alpha"]})
    after = client.get("/metrics").get_data(as_text=True)
    # info, status and the created time exist for every configured key from the start
    assert len(token_series(before, "alpha")) == 3
    assert len(token_series(after, "alpha")) == 19
    assert "18 + R·M·C + 4·L + B + K" in CATALOGUE


def example_app(tmp_path):
    """The docs' example: a key with both budgets on the default limits, five routes."""
    path = str(tmp_path / "keys.yml")
    raw = add_key(path, "example", name="Example", tenant="acme", budget_usd={"daily": 5, "monthly": 100})
    app = Flask("example")
    for i in range(5):
        app.add_url_rule(f"/r{i}/<int:n>", f"r{i}", lambda n: (jsonify(n=n), 200 if n else 404))
    analytics = TokenAnalytics(app, keys_file=path, metrics_public=True)
    return app, analytics, raw


def test_the_documented_example_costs_30_series_per_token_and_4_per_llm_model(tmp_path):
    """10,000 tokens like this one are 300,000 series (docs/metrics.md, docs/scaling.md)."""
    app, analytics, raw = example_app(tmp_path)
    client = app.test_client()
    for i in range(5):
        for n in (1, 0, 1):                                   # 200 and 404 on each route
            r = client.get(f"/r{i}/{n}", headers={"X-API-Key": raw}, buffered=True)
            assert r.status_code == (200 if n else 404)
    text = client.get("/metrics").get_data(as_text=True)
    series = token_series(text, "example")
    assert len(series) == 30, "\n".join(series)
    assert "10,000 × (18 + 10 + 2) = **300,000 series**" in CATALOGUE
    for model in ("gpt-4o", "gpt-4o-mini"):
        analytics.count_llm("example", validate_usage("openai", model, 10, 5))
    text = client.get("/metrics").get_data(as_text=True)
    assert len(token_series(text, "example")) == 38
    assert "with 2 models each, 38 per token, 380,000 series" in CATALOGUE


def test_overflow_label_is_shared_across_families():
    m = Metrics(max_tokens=1)
    assert m.tokens.admit("a") == "a"
    assert m.tokens.admit("b") == "__overflow__"
    assert m.tokens.admit("__unauthenticated__") == "__unauthenticated__"


def test_user_facing_text_never_names_the_product_documents():
    """Users never saw the seed documents: "seed 003's JSON" says nothing to them."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "exporter").rglob("*.py")), *sorted((ROOT / "exporter").rglob("*.js")),
             *sorted((ROOT / "exporter").rglob("*.html")), *sorted((ROOT / "exporter").rglob("*.md"))]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bseed 00\d", line, re.I)]
    assert found == []


def test_readme_gives_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme
    assert "make demo" in readme


def test_readme_layout_names_every_module_under_its_folder():
    """Each subpackage of the package (and the dev stack) is listed with every module in it."""
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    folders = {"devstack": ROOT / "devstack"}
    package = ROOT / "exporter" / "api_token_exporter"
    folders.update({p.name: p for p in package.iterdir() if (p / "__init__.py").exists()})
    assert {"core", "mixin", "alerting", "analytics", "web", "proxy", "cli", "devstack"} <= set(folders)
    missing = []
    for name, folder in folders.items():
        line = re.search(rf"`{name}/`(.*?)(?=\n\s*- `|\Z)", layout, re.S)
        if line is None:
            missing.append(f"{name}/")
            continue
        missing += [f"{name}/{p.stem}" for p in folder.glob("*.py")
                    if p.stem not in ("__init__", "__main__") and f"`{p.stem}`" not in line.group(1)]
        missing += [f"{name}/{p.name}/" for p in folder.iterdir() if (p / "__init__.py").exists()
                    and f"`{p.name}/`" not in line.group(1)]
    missing += [p.stem for p in package.glob("*.py") if p.stem != "__init__" and f"`{p.stem}`" not in layout]
    assert missing == []


def test_the_anomaly_labels_in_the_docs_are_the_rules_own():
    """A matcher copied from docs/alerts.md's anomaly table matches the alerts the rules fire."""
    root = pathlib.Path(__file__).parent.parent
    rules = {}
    for group in yaml.safe_load((root / "prometheus" / "rules" / "apitoken-anomalies.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rules.setdefault(rule["alert"], []).append(rule.get("labels", {}))
    rows = [line for line in (root / "docs" / "alerts.md").read_text().splitlines()
            if re.match(r"\| [^|]+ \| `ApiToken\w+` \| `anomaly=", line)]
    assert len(rows) >= 6
    for row in rows:
        name = re.search(r"`(ApiToken\w+)`", row).group(1)
        assert name in rules, name
        for label, value in re.findall(r'`(\w+)="(\w+)"`', row):
            assert any(labels.get(label) == value for labels in rules[name]), (name, label, value, rules[name])
