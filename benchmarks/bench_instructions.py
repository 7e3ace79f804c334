"""Per-request cost of the middleware in CPU instructions, counted by valgrind (callgrind):
the same four variants as bench_middleware.py, but a count that does not move with the
machine's load, so a change of a few microseconds is visible run to run.

For each variant, one process serves N requests and another serves none (both after the same
warm-up); the difference divided by N is the instructions per request.

    python benchmarks/bench_instructions.py [--requests 1000]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

DRIVE = """
import os, sys
sys.path.insert(0, {here!r})
from werkzeug.test import EnvironBuilder
import bench_middleware
apps = bench_middleware.variants({keys!r})
app = apps[{variant!r}]
environ = EnvironBuilder(path="/items/7", headers={{"X-API-Key": os.environ["BENCH_KEY"]}}).get_environ()
bench_middleware.run_once(app, environ, 300)          # warm-up: every cache and plan built
if {n}:
    bench_middleware.run_once(app, environ, {n})
"""


def count(variant: str, keys_file: str, raw: str, n: int, workdir: str) -> int:
    out = os.path.join(workdir, "callgrind.out")
    script = DRIVE.format(here=HERE, keys=keys_file, variant=variant, n=n)
    result = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             os.path.realpath(sys.executable), "-c", script],
                            capture_output=True, text=True, timeout=900,
                            # the real binary does not find the venv by itself: hand it this sys.path
                            env=dict(os.environ, BENCH_KEY=raw,
                                     PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"valgrind run failed for {variant}:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args(argv)
    if not shutil.which("valgrind"):
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    sys.path.insert(0, HERE)
    from bench_middleware import variants
    from api_token_exporter.core.keystore import add_key
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.yml")
        raw = add_key(keys_file, "bench")
        per_request = {}
        for name in variants(keys_file):
            per_request[name] = (count(name, keys_file, raw, args.requests, tmp)
                                 - count(name, keys_file, raw, 0, tmp)) / args.requests
    base = per_request["bare Flask"]
    print(f"python {sys.version.split()[0]}, valgrind callgrind, {args.requests} requests per variant")
    print("| variant | instructions per request | added over bare Flask |")
    print("|---|---:|---:|")
    for name, value in per_request.items():
        added = "—" if name == "bare Flask" else f"{value - base:+,.0f}"
        print(f"| {name} | {value:,.0f} | {added} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
