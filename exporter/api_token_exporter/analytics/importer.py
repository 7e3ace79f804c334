"""Past usage into Prometheus: `api-token-exporter import`.

    records (CSV, JSON Lines, a SQL table or query)
      -> validated rows (a report of the rejected ones, with reasons)
      -> this project's counters and histograms, per series, at `step` resolution
      -> one OpenMetrics file -> `promtool tsdb create-blocks-from openmetrics`
      -> blocks moved into Prometheus's data directory (it loads them within a minute).

The series are the live ones (the catalogue's names, labels, buckets and whole-unit sums) with
``job`` and ``instance="import"`` added, so sums over instances add imported and live usage.
Rows at or after the cut-over (``until``, the moment live metrics started) are refused: they
are counted live. A series gets a sample where it changed and, between two changes, at least
every HEARTBEAT seconds: exact totals (docs/analytics.md) look back an hour for a range's
starting value, so a quiet hour must not read as a new series.
"""
from __future__ import annotations

import bisect
import csv
import decimal
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..core import validation
from ..core.timestamps import TimestampError, parse_timestamp
from .exact import BASELINE_LOOKBACK
from ..core.metrics import LATENCY_BUCKETS, MICROSECONDS, NANO_USD, UNMATCHED_ROUTE, catalogue
from ..core.pricing import Pricing
from ..core.store import escape_label, float_to_go_string, rebucket
from ..core.usage import DETAIL_FIELDS, LLMUsage, validate_usage

HEARTBEAT = BASELINE_LOOKBACK - 300   # seconds between samples of a quiet series, a margin under the lookback
MAX_BLOCK = "2400h"               # promtool reads its input once per block: few, long blocks
# record field -> seed-style column name (the APIUsage table: api_key_id, endpoint, ...)
DEFAULT_COLUMNS = {"time": "created_at", "token": "api_key_id", "route": "endpoint", "method": "method",
                   "code": "status_code", "duration": "response_time", "service": "service",
                   "model": "model", "input_tokens": "prompt_tokens", "output_tokens": "completion_tokens",
                   "cached_input_tokens": "cached_tokens", "cache_write_tokens": "cache_write_tokens",
                   "reasoning_tokens": "reasoning_tokens"}
REQUIRED = ("time", "token", "route", "code")
USAGE_FIELDS = ("input_tokens", "output_tokens") + DETAIL_FIELDS


class ImportFailed(ValueError):
    """The import as a whole cannot go on (a missing column, a database error, promtool, ...)."""


@dataclass
class Rejected:
    line: object                      # the line of a file; a database row's primary key, or position
    reason: str


@dataclass
class ImportResult:
    rows: int = 0                     # records read (a file's lines but its header and blank ones)
    accepted: int = 0
    rejected: List[Rejected] = field(default_factory=list)
    blank: int = 0                    # blank lines of a file, skipped
    tokens: Dict[str, int] = field(default_factory=dict)    # rows imported per key id
    series: int = 0
    samples: int = 0
    first: Optional[float] = None
    last: Optional[float] = None
    blocks: List[str] = field(default_factory=list)


# -- reading: (line of the file or row of the result, record) -----------------------------------
Records = Iterator[Tuple[object, dict]]
BLANK: dict = {}                      # a blank line: counted, not a record


def read_csv(path: str, columns: Dict[str, str]) -> Records:
    """One record per physical line: an unclosed quote or a wrong number of fields is that
    line's error, never a reason to read the lines after it into it (no field of a usage record
    holds a line break). A line without quotes is split as it is; one with quotes is read by
    the csv module, strictly."""
    header = None
    with open(path, newline="", encoding="utf-8-sig") as fh:       # -sig: Excel's byte-order mark
        for n, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if not text.strip():
                yield n, BLANK
                continue
            try:
                fields = next(csv.reader((text,), strict=True)) if '"' in text else text.split(",")
            except csv.Error as exc:
                if header is None:
                    raise ImportFailed(f"{path}: line {n}, the header: {exc}") from None
                yield n, {"__error__": f"not CSV: {exc} (an unclosed or stray quote)"}
                continue
            if header is None:
                _check_columns(fields, columns, path)
                header = fields
            elif len(fields) != len(header):
                yield n, {"__error__": f"{len(fields)} fields where the header has {len(header)}"}
            else:
                yield n, dict(zip(header, fields))


def read_jsonl(path: str) -> Records:
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                yield n, BLANK
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                doc = {"__error__": f"not JSON: {exc.msg}: column {exc.colno}"}
            yield n, doc if isinstance(doc, dict) else {"__error__": "not a JSON object"}


def _check_columns(names, columns: Dict[str, str], where: str) -> None:
    """A table without a required column is a mistake in the mapping, not a bad row."""
    missing = [f"{columns[f]!r} ({f})" for f in REQUIRED if columns[f] not in names]
    if missing:
        raise ImportFailed(f"{where} has no column {', '.join(missing)}; its columns: {', '.join(map(str, names))}"
                           " (point a field at another column with --map FIELD=COLUMN)")


def read_sql(url: str, columns: Dict[str, str], table: Optional[str] = None, query: Optional[str] = None,
             batch: int = 10_000) -> Records:
    """Rows of a table or a query, by SQLAlchemy URL (sqlite:///f.db, postgresql+psycopg://...).
    A table is read in the order of its primary key and a row is named by it (``id=1565``), so a
    rejected one can be found; a query's rows by their position in its result."""
    from ..core.config import optional_import
    sa = optional_import("sqlalchemy", "history", "Importing from a database")
    try:
        engine = sa.create_engine(url)
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        raise ImportFailed(f"database URL: {exc}") from None
    n = 0
    try:
        with engine.connect() as conn:
            key: List[str] = []
            if query:
                statement = sa.text(query)
            else:
                reflected = sa.Table(table, sa.MetaData(), autoload_with=conn)
                key = [c.name for c in reflected.primary_key.columns]
                statement = sa.select(reflected).order_by(*reflected.primary_key.columns)
            result = conn.execution_options(stream_results=True).execute(statement)
            keys = list(result.keys())
            _check_columns(keys, columns, f"table {table}" if table else "the query")
            at = [keys.index(k) for k in key]
            while True:
                chunk = result.fetchmany(batch)
                if not chunk:
                    break
                for row in chunk:
                    n += 1
                    name = ", ".join(f"{k}={row[i]}" for k, i in zip(key, at)) if at else n
                    yield name, dict(zip(keys, row))
    except sa.exc.NoSuchTableError:
        raise ImportFailed(f"no table {table!r} in the database") from None
    except sa.exc.SQLAlchemyError as exc:        # refused connection, bad query, ...
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ImportFailed(f"database: {detail} (after {n} rows)") from None
    finally:
        engine.dispose()


def open_source(source: str, columns: Dict[str, str], table: Optional[str] = None,
                query: Optional[str] = None) -> Records:
    if "://" in source:
        if not (table or query):
            raise ImportFailed("a database source needs --table or --query")
        return read_sql(source, columns, table, query)
    if not os.path.exists(source):
        raise ImportFailed(f"{source}: no such file")
    if source.endswith((".jsonl", ".ndjson", ".json")):
        return read_jsonl(source)
    return read_csv(source, columns)


# -- one row --------------------------------------------------------------------------------------
def parse_time(value) -> float:
    """A row's time (core/timestamps.py's grammar; a database may give a datetime or a Decimal)."""
    try:
        return parse_timestamp(float(value) if isinstance(value, decimal.Decimal) else value)
    except TimestampError as exc:
        raise validation.ValidationError(str(exc)) from None


@dataclass
class Row:
    time: float
    token: str
    route: str
    method: str
    code: int
    duration: Optional[float]
    llm: Optional[LLMUsage]


def parse_row(raw: dict, columns: Dict[str, str], duration_scale: float) -> Row:
    if "__error__" in raw:
        raise validation.ValidationError(raw["__error__"])

    def get(name):
        value = raw.get(columns.get(name, name))
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    def num(name):                     # CSV cells are text; JSON and SQL give numbers
        value = get(name)
        if isinstance(value, decimal.Decimal):     # PostgreSQL NUMERIC
            return int(value) if value == value.to_integral_value() else float(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                try:
                    return float(text)
                except ValueError:
                    raise validation.ValidationError(f"{name}: not a number: {text[:40]!r}") from None
        return value

    for name in REQUIRED:
        if get(name) is None:
            raise validation.ValidationError(f"{name}: missing (column {columns.get(name, name)!r})")
    code = validation.whole_number("code", num("code"), 599)
    if code < 100:
        raise validation.ValidationError(f"code: {code} is not an HTTP status")
    duration = num("duration")
    if duration is not None:
        duration = validation.number("duration", duration, 0.0, 86400.0 / duration_scale) * duration_scale
    service, model, llm = get("service"), get("model"), None
    if model is not None or service is not None:
        if model is None or service is None:
            raise validation.ValidationError("service and model go together")
        llm = validate_usage(service, model, *(num(name) or 0 for name in USAGE_FIELDS))
    return Row(parse_time(get("time")), validation.token_id("token", str(get("token")).strip()),
               validation.route("route", get("route")), validation.method(get("method") or "GET"),
               code, duration, llm)


# -- aggregation ----------------------------------------------------------------------------------
class Aggregate:
    """Per series, the amount added in each step-long bin, in whole units (counts, microseconds,
    nano-USD) as the live store keeps them, so totals come out exactly as live ones would."""

    def __init__(self, step: int, pricing: Optional[Pricing]):
        self.step = step
        self.pricing = pricing
        self.counters: Dict[Tuple[str, tuple], Dict[int, int]] = {}
        self.histograms: Dict[Tuple[str, tuple], Dict[int, List[int]]] = {}
        self.first = self.last = None

    def _count(self, name: str, labels: tuple, b: int, amount: int) -> None:
        bins = self.counters.get((name, labels))
        if bins is None:
            bins = self.counters[(name, labels)] = {}
        bins[b] = bins.get(b, 0) + amount

    def _observe(self, name: str, labels: tuple, b: int, seconds: float) -> None:
        bins = self.histograms.get((name, labels))
        if bins is None:
            bins = self.histograms[(name, labels)] = {}
        cell = bins.get(b)
        if cell is None:
            cell = bins[b] = [0] * (len(LATENCY_BUCKETS) + 3)    # buckets, +Inf, count, sum (µs)
        cell[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        cell[-2] += 1
        cell[-1] += int(round(seconds * MICROSECONDS))

    def add(self, row: Row) -> None:
        b = int(row.time // self.step)
        self.first = row.time if self.first is None else min(self.first, row.time)
        self.last = row.time if self.last is None else max(self.last, row.time)
        self.add_requests(b, row.token, row.route, row.method, row.code, 1)
        if row.duration is not None:
            self._observe("apitoken_request_duration_seconds", (row.token,), b, row.duration)
            self._observe("apitoken_route_request_duration_seconds", (row.route, row.method), b, row.duration)
        if row.llm is not None:
            self.add_llm(b, row.token, row.llm)

    def add_requests(self, b: int, token: str, route: str, method: str, code: int, count: int) -> None:
        self._count("apitoken_requests_total", (token, route, method, str(code)), b, count)

    def add_country(self, b: int, token: str, country: str, count: int) -> None:
        self._count("apitoken_requests_by_country_total", (token, country), b, count)

    def add_refusals(self, b: int, token: str, route: str, code: int, count: int, reason: str = "",
                     window: str = "") -> None:
        """Requests refused by auth (``reason``) or a rate limit (``window``), counted as live ones
        are, each answered in about a millisecond."""
        self.add_requests(b, token, route, "GET", code, count)
        self.add_durations(b, token, route, "GET", [count] + [0] * len(LATENCY_BUCKETS), count * 0.001)
        if reason:
            self._count("apitoken_auth_failures_total", (reason,), b, count)
        if window:
            self._count("apitoken_rate_limited_total", (token, window), b, count)

    def add_durations(self, b: int, token: str, route: str, method: str, per_bucket: List[int],
                      total_seconds: float) -> None:
        """Several observations at once: how many fell in each bucket (LATENCY_BUCKETS, then +Inf)."""
        n = sum(per_bucket)
        for name, key in (("apitoken_request_duration_seconds", (token,)),
                          ("apitoken_route_request_duration_seconds", (route, method))):
            bins = self.histograms.setdefault((name, key), {})
            cell = bins.get(b)
            if cell is None:
                cell = bins[b] = [0] * (len(LATENCY_BUCKETS) + 3)
            for i, c in enumerate(per_bucket):
                cell[i] += c
            cell[-2] += n
            cell[-1] += int(round(total_seconds * MICROSECONDS))

    def add_llm(self, b: int, token: str, usage: LLMUsage, requests: int = 1) -> None:
        """``usage`` of ``requests`` requests together; tokens by type as the live store has them."""
        key = (token, usage.service, usage.model)
        for kind, n in usage.exported_parts().items():
            self._count("apitoken_llm_tokens_total", key + (kind,), b, n)
        self._count("apitoken_llm_requests_total", key, b, requests)
        price = self.pricing.price(usage.service, usage.model) if self.pricing else None
        if price is None:
            self._count("apitoken_llm_unpriced_requests_total", (usage.service, usage.model), b, requests)
        else:
            self._count("apitoken_llm_cost_usd_total", key, b, int(round(price.cost(usage) * NANO_USD)))


LABELS = {family.name: tuple(family.labelnames) for family in catalogue()}
BUCKETS = {family.name: family.buckets for family in catalogue() if family.kind == "histogram"}
SCALES = {"apitoken_llm_cost_usd_total": NANO_USD}


def sample_times(bins: Iterable[int], step: int) -> List[Tuple[int, bool]]:
    """(bin, changed) for the bins where a series changed, plus heartbeats (changed False)
    filling any gap longer than HEARTBEAT."""
    out: List[Tuple[int, bool]] = []
    every = max(1, HEARTBEAT // step)
    for b in sorted(bins):
        if out:
            gap = out[-1][0] + every
            while gap < b:
                out.append((gap, False))
                gap += every
        out.append((b, True))
    return out


def write_openmetrics(agg: Aggregate, out, job: str, instance: str) -> Tuple[int, int]:
    """Write every series in OpenMetrics text (families contiguous, samples in time order);
    return (series, samples)."""
    step = agg.step
    base = f'instance="{escape_label(instance)}",job="{escape_label(job)}"'
    series = samples = 0

    def labels_text(name: str, key: tuple, extra: str = "") -> str:
        pairs = ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(LABELS[name], key))
        return "{" + ",".join(p for p in (pairs, base, extra) if p) + "}"

    by_family: Dict[str, list] = {}
    for (name, key), bins in agg.counters.items():
        by_family.setdefault(name, []).append((key, bins))
    for name in sorted(by_family):
        out.write(f"# TYPE {name[:-len('_total')]} counter\n")
        scale = SCALES.get(name, 1)
        for key, bins in sorted(by_family[name]):
            series += 1
            prefix = name + labels_text(name, key) + " "
            total, line, lines = 0, "", []
            for b, changed in sample_times(bins, step):
                if changed:                   # a heartbeat repeats the value's text
                    total += bins[b]
                    line = f"{prefix}{float_to_go_string(total / scale)} "
                lines.append(f"{line}{(b + 1) * step}\n")   # a bin's end
            out.write("".join(lines))
            samples += len(lines)
    hist_family: Dict[str, list] = {}
    for (name, key), bins in agg.histograms.items():
        hist_family.setdefault(name, []).append((key, bins))
    for name in sorted(hist_family):
        out.write(f"# TYPE {name} histogram\n")
        bounds = BUCKETS[name]              # cells are kept in LATENCY_BUCKETS, written in these
        les = [float_to_go_string(b) for b in bounds] + ["+Inf"]
        for key, bins in sorted(hist_family[name]):
            series += len(les) + 2
            running = [0] * (len(LATENCY_BUCKETS) + 3)
            bucket_prefixes = [f"{name}_bucket{labels_text(name, key, f'le={chr(34)}{le}{chr(34)}')} " for le in les]
            count_prefix = f"{name}_count{labels_text(name, key)} "
            sum_prefix = f"{name}_sum{labels_text(name, key)} "
            texts: List[str] = []            # each line's name, labels and value, up to the time
            chunks = []
            for b, changed in sample_times(bins, step):
                if changed:                   # a heartbeat repeats the values' texts
                    running = [x + y for x, y in zip(running, bins[b])]
                    per_bucket = rebucket(running[:len(LATENCY_BUCKETS) + 1], LATENCY_BUCKETS, bounds)
                    texts = [f"{prefix}{cumulative}" for prefix, cumulative in
                             zip(bucket_prefixes, accumulate(int(n) for n in per_bucket))]
                    texts += [f"{count_prefix}{running[-2]}",
                              f"{sum_prefix}{float_to_go_string(running[-1] / MICROSECONDS)}"]
                end = f" {(b + 1) * step}\n"
                chunks.append(end.join(texts) + end)
            out.write("".join(chunks))
            samples += len(chunks) * (len(les) + 2)
    out.write("# EOF\n")
    return series, samples


# -- the whole import ------------------------------------------------------------------------------
Progress = Optional[Callable[[str], None]]


def find_promtool(given: Optional[str] = None) -> str:
    found = given or shutil.which("promtool")
    if not found:
        raise ImportFailed("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def build_blocks(result: ImportResult, agg: Aggregate, output_dir: str, job: str, instance: str,
                 promtool: Optional[str] = None, progress: Progress = None) -> None:
    promtool = find_promtool(promtool)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ate-import-", dir=output_dir) as work:
        text = os.path.join(work, "samples.om.txt")
        with open(text, "w", encoding="utf-8") as fh:
            result.series, result.samples = write_openmetrics(agg, fh, job, instance)
        if progress:
            progress(f"{result.samples} samples of {result.series} series: building TSDB blocks")
        result.blocks += openmetrics_to_blocks(promtool, text, output_dir, work)


def openmetrics_to_blocks(promtool: str, text: str, output_dir: str, work: str) -> List[str]:
    """An OpenMetrics file as TSDB blocks (`promtool tsdb create-blocks-from openmetrics`), built
    in ``work`` (a directory beside ``output_dir``) and then renamed into ``output_dir``: a
    Prometheus reloading its blocks never sees one half copied (it ignores directories whose
    names are not block ids). Returns the blocks' paths."""
    blocks = os.path.join(work, "blocks")
    done = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics",
                           f"--max-block-duration={MAX_BLOCK}", "--quiet", text, blocks],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ImportFailed(f"promtool could not build blocks: {(done.stderr or done.stdout).strip()[-500:]}")
    moved = []
    for name in sorted(os.listdir(blocks)):
        os.rename(os.path.join(blocks, name), os.path.join(output_dir, name))
        moved.append(os.path.join(output_dir, name))
    return moved


def route_matcher(templates: List[str]) -> Callable[[str], str]:
    """Raw paths to route templates, as the middleware's ``routes`` does; without templates the
    column is taken as the route already."""
    if not templates:
        return lambda path: path
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import Map, Rule
    adapter = Map([Rule(t) for t in templates]).bind("localhost")

    def match(path: str) -> str:
        try:
            rule, _ = adapter.match(path.split("?", 1)[0], method="GET", return_rule=True)
            return rule.rule
        except HTTPException:
            return UNMATCHED_ROUTE
    return match


def run_import(source: str, output_dir: str, *, table: Optional[str] = None, query: Optional[str] = None,
               columns: Optional[Dict[str, str]] = None, until: Optional[float] = None, step: int = 60,
               duration_unit: str = "s", pricing: Optional[Pricing] = None, job: str = "api-token-exporter",
               instance: str = "import", routes: Optional[List[str]] = None, max_series: int = 200_000,
               max_age_days: float = 400, progress: Progress = None, promtool: Optional[str] = None,
               dry_run: bool = False, result: Optional[ImportResult] = None,
               known_tokens: Optional[Iterable[str]] = None) -> ImportResult:
    """Read, validate, aggregate and write blocks; rejected rows are listed, never fatal. Pass
    ``result`` to keep what was read (the rejected rows) when the import fails part way. With
    ``known_tokens`` (the key ids of a key file), a row of any other key id is rejected."""
    if not 1 <= step <= HEARTBEAT or 86400 % step:
        raise ImportFailed(f"step must divide a day and be at most {HEARTBEAT} seconds (60, 300, ...)")
    to_route = route_matcher(routes or [])
    cols = dict(DEFAULT_COLUMNS, **(columns or {}))
    scale = {"s": 1.0, "ms": 0.001}[duration_unit]
    until = time.time() if until is None else until
    oldest = until - max_age_days * 86400
    agg = Aggregate(step, pricing)
    result = result if result is not None else ImportResult()
    known = frozenset(known_tokens) if known_tokens is not None else None
    tokens = result.tokens
    last_report = time.monotonic()
    n = 0
    for where, raw in open_source(source, cols, table, query):
        if raw is BLANK:
            result.blank += 1
            continue
        n += 1
        result.rows = n
        try:
            row = parse_row(raw, cols, scale)
            if known is not None and row.token not in known:
                raise validation.ValidationError(f"token: {row.token!r} is not a key id of the key file")
            if row.time >= until:
                raise validation.ValidationError(f"time: at or after the cut-over {_iso(until)} (live metrics count it)")
            if row.time < oldest:
                raise validation.ValidationError(f"time: before {_iso(oldest)}, more than {max_age_days:g} days "
                                                 "before the cut-over (--max-age-days; Prometheus keeps no more)")
        except (validation.ValidationError, TypeError, ValueError) as exc:
            result.rejected.append(Rejected(where, str(exc)))
            continue
        row.route = to_route(row.route)
        agg.add(row)
        result.accepted += 1
        tokens[row.token] = tokens.get(row.token, 0) + 1
        if len(agg.counters) + len(agg.histograms) * (len(LATENCY_BUCKETS) + 3) > max_series:
            raise ImportFailed(f"more than {max_series} series after {n} rows: is the route column raw "
                               "paths? Give route templates (--route '/items/<id>'), or raise --max-series")
        if progress and time.monotonic() - last_report >= 1:
            last_report = time.monotonic()
            progress(f"read {n} rows ({len(result.rejected)} rejected)")
    result.first, result.last = agg.first, agg.last
    if progress:
        progress(f"read {result.rows} rows ({len(result.rejected)} rejected)")
    if result.accepted:
        ledger = ImportLedger(output_dir)
        ledger.check(source, job, instance, result.first, result.last, table, query)
        if not dry_run:
            build_blocks(result, agg, output_dir, job, instance, promtool, progress)
            ledger.add(source, job, instance, result, table, query)
    return result


class ImportLedger:
    """The imports written into a directory (``api-token-exporter-imports.json`` there, which
    Prometheus ignores): a new import whose series would overlap an earlier one's in time is
    refused. Two imports with the same labels make one series per label set, and their samples
    interleaved read as counter resets (1, 2, 3, 1, 2, ...); with another ``--instance`` they are
    separate series, and every sum over instances adds both."""

    NAME = "api-token-exporter-imports.json"

    def __init__(self, directory: str):
        self.path = os.path.join(directory, self.NAME)

    def entries(self) -> List[dict]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                found = json.load(fh)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ImportFailed(f"{self.path}: {exc} (the list of earlier imports; fix or remove it)") from None
        return found if isinstance(found, list) else []

    @staticmethod
    def _source(source: str, table: Optional[str], query: Optional[str]) -> str:
        if "://" in source:             # never the URL itself: it may hold a password
            return f"database {table!r}" if table else f"database query {query!r}"
        return os.path.abspath(source)

    def check(self, source: str, job: str, instance: str, first: float, last: float,
              table: Optional[str] = None, query: Optional[str] = None) -> None:
        for entry in self.entries():
            if (entry.get("job"), entry.get("instance")) != (job, instance):
                continue
            if not (last < entry["first"] or first > entry["last"]):
                again = " (the same source)" if entry.get("source") == self._source(source, table, query) else ""
                raise ImportFailed(
                    f"rows from {_iso(first)} to {_iso(last)} overlap the import of {entry.get('source')}{again} "
                    f"({_iso(entry['first'])} to {_iso(entry['last'])}, instance={instance!r}) into this "
                    f"directory: the two would be one series per label set, read as counter resets. Import it "
                    f"with another --instance (sums over instances add both), or remove that import's blocks "
                    f"and its entry in {self.path}")

    def add(self, source: str, job: str, instance: str, result: ImportResult, table: Optional[str] = None,
            query: Optional[str] = None) -> None:
        entries = self.entries() + [{
            "source": self._source(source, table, query), "job": job, "instance": instance,
            "first": result.first, "last": result.last, "rows": result.accepted,
            "blocks": [os.path.basename(b) for b in result.blocks], "imported_at": _iso(time.time())}]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(entries, fh, indent=1)
        os.replace(tmp, self.path)


def _iso(t: float) -> str:
    return f"{dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def write_rejected(path: str, rejected: List[Rejected], where: str = "line") -> None:
    """Line of the file (for a database ``where="row"``: its primary key or position) and reason,
    one per rejected record."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([where, "reason"])
        for r in rejected:
            writer.writerow([r.line, r.reason])


def progress_printer(enabled: bool) -> Progress:
    if not enabled:
        return None

    def show(message: str) -> None:
        print(f"\r{message}\033[K" if sys.stderr.isatty() else message, end="" if sys.stderr.isatty() else "\n",
              file=sys.stderr, flush=True)
    return show
