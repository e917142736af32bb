"""chromadb's own API test suite on ``chromadb.PersistentClient`` and on ``SafeClient``, compared.

Usage (from the repository root, after ``pip install -e '.[test,upstream]'``)::

    .venv/bin/python benchmarks/upstream_api.py            # both sides, ~3 min on 2 cores
    .venv/bin/python benchmarks/upstream_api.py -k test_add  # a subset (pytest's -k)
    .venv/bin/python benchmarks/upstream_api.py --max-examples 5 --timeout 180 \
        --out benchmarks/results/upstream_api_property.md chromadb/test/property/test_add.py \
        chromadb/test/property/test_embeddings.py chromadb/test/property/test_filtering.py \
        chromadb/test/property/test_collections.py          # property tests, ~3 min

Runs the tests chromadb's wheel ships (``DEFAULT_TESTS``: ``chromadb/test/api/``,
``test_api.py``, ``test_client.py`` and the other files that use its client fixtures) twice,
each in a pytest process of its own with ``_upstream_plugin.py``: once with chromadb's
``client`` and ``client_factories`` fixtures yielding ``chromadb.PersistentClient``, once
yielding ``safechroma.SafeClient``, each on a fresh directory per test. Prints and writes
(``--out``, default ``benchmarks/results/upstream_api.md`` and ``.json`` beside it) the outcome
counts and wall time of each side and every test whose outcome differs.

Each side runs in a fresh working directory with a fresh ``HOME``: no hypothesis example
database, pytest cache or downloaded model carries over from one side to the other, and
hypothesis draws from the same seed on both. There is no network here but the package index, so
the tests that need chromadb's default embedding function (it downloads a model) fail alike on
both sides; what matters is that outcomes match. A per-test timeout keeps anything from hanging.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _sysinfo  # noqa: E402

# The class each side's fixtures open (as the plugin records it: module.qualname).
SIDES = {
    "persistent": "chromadb.api.client.Client",  # what chromadb.PersistentClient returns
    "safe": "safechroma.api.client.SafeClient",
}
# chromadb/test/property/ is left out: its hypothesis state machines took over 15 minutes on
# PersistentClient alone here (50 examples each, the "fast" preset).
DEFAULT_TESTS = (
    "chromadb/test/api",
    "chromadb/test/test_api.py",
    "chromadb/test/test_client.py",
    "chromadb/test/test_multithreaded.py",
    "chromadb/test/client/test_database_tenant.py",
    "chromadb/test/client/test_multiple_clients_concurrency.py",
    "chromadb/test/data_loader",
)
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def site_root() -> Path:
    """The directory that holds the installed ``chromadb`` package (not imported here)."""
    spec = importlib.util.find_spec("chromadb")
    if spec is None or spec.origin is None:
        raise SystemExit("chromadb is not installed in this interpreter")
    return Path(spec.origin).resolve().parent.parent


def run_side(side: str, tests: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One pytest process over ``tests`` with the client fixture of ``side``."""
    root = site_root()
    work = Path(tempfile.mkdtemp(prefix=f"upstream-{side}-"))
    home = work / "home"
    home.mkdir()
    outcomes = work / "outcomes.json"
    env = dict(os.environ)
    env.update(
        SAFECHROMA_UPSTREAM_CLIENT=side,
        SAFECHROMA_UPSTREAM_OUTCOMES=str(outcomes),
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        # chromadb's conftest: the local Rust bindings' systems only (what PersistentClient is).
        CHROMA_RUST_BINDINGS_TEST_ONLY="1",
        PROPERTY_TESTING_PRESET="fast",
        ANONYMIZED_TELEMETRY="False",
        HF_HUB_OFFLINE="1",
        HOME=str(home),
    )
    if args.max_examples:
        env["SAFECHROMA_UPSTREAM_MAX_EXAMPLES"] = str(args.max_examples)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        os.devnull,  # not this repository's pytest configuration (filterwarnings=error, ...)
        "--rootdir",
        str(root),
        "-p",
        "_upstream_plugin",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--timeout={args.timeout}",
        "--hypothesis-seed=0",
        "-q",
        "-rN",
        "--durations=15",
        *(["-k", args.k] if args.k else []),
        *[str(root / t) for t in tests],
    ]
    log = work / "pytest.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    try:
        recorded = json.loads(outcomes.read_text())
    except (OSError, ValueError):
        recorded = {}
    results: dict[str, dict[str, str]] = recorded.get("tests", {})
    opened: dict[str, int] = recorded.get("opened", {})
    if not results:
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, args.logs / f"pytest-{side}.log")
    shutil.rmtree(work, ignore_errors=True)
    return {"side": side, "wall_s": wall, "exit": proc.returncode, "summary": tail[0],
            "opened": opened, "results": results}  # fmt: skip


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, str]]:
    """Every test whose outcome differs between runs ``a`` and ``b`` (or that one lacks)."""
    diffs = []
    ra, rb = a["results"], b["results"]
    for nodeid in sorted(set(ra) | set(rb)):
        ea = ra.get(nodeid, {"outcome": "absent", "message": ""})
        eb = rb.get(nodeid, {"outcome": "absent", "message": ""})
        if ea["outcome"] != eb["outcome"]:
            diffs.append(
                {
                    "test": nodeid,
                    a["side"]: ea["outcome"],
                    b["side"]: eb["outcome"],
                    f"{a['side']}_message": ea["message"],
                    f"{b['side']}_message": eb["message"],
                }
            )
    return diffs


def render(runs: list[dict[str, Any]], diffs: list[dict[str, str]], cmdline: str) -> str:
    env = _sysinfo.machine()
    lines = [
        "# chromadb's API test suite: PersistentClient vs SafeClient",
        "",
        f"`{cmdline}` on chromadb {env['chromadb']}, Python {env['python']}, "
        f"{env['cpu_model']} ({env['usable_cpus']} usable CPUs), commit {env['git_commit']}"
        f"{' (src modified)' if env['src_dirty'] else ''}, load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. Wall time is each pytest process's.",
        "",
        "| side | fixtures' client | clients opened | "
        + " | ".join(OUTCOMES)
        + " | total | wall time | pytest exit |",
        "|---|---|---|" + "---|" * len(OUTCOMES) + "---|---|---|",
    ]
    for run in runs:
        counts = Counter(e["outcome"] for e in run["results"].values())
        lines.append(
            f"| {run['side']} | `{SIDES[run['side']]}` | {sum(run['opened'].values())} | "
            + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES)
            + f" | {sum(counts.values())} | {run['wall_s']:.1f} s | {run['exit']} |"
        )
    lines += ["", f"## Tests whose outcome differs: {len(diffs)}", ""]
    if diffs and len(runs) == 2:
        a, b = runs[0]["side"], runs[1]["side"]
        lines += [f"| test | {a} | {b} | {b} message |", "|---|---|---|---|"]
        for d in diffs:
            msg = (d[f"{b}_message"] or d[f"{a}_message"]).replace("|", "\\|")
            lines.append(f"| `{d['test']}` | {d[a]} | {d[b]} | {msg} |")
    if len(runs) == 2:
        # What fails on both sides, and why: the same for both is what the comparison accepts.
        same: Counter[tuple[str, str]] = Counter()
        ra, rb = runs[0]["results"], runs[1]["results"]
        for nodeid, e in ra.items():
            other = rb.get(nodeid)
            if other and other["outcome"] == e["outcome"] and e["outcome"] in ("failed", "error"):
                same[(e["outcome"], e["message"].split(" in ")[0][:120])] += 1
        lines += ["", "## Failing alike on both sides, by first line of the error", ""]
        lines += ["| outcome | error (first side's) | tests |", "|---|---|---|"]
        for (outcome, msg), n in sorted(same.items(), key=lambda kv: -kv[1]):
            cell = msg.replace("|", "\\|")
            lines.append(f"| {outcome} | {cell} | {n} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS),
                        help="paths under the installed chromadb's parent directory")  # fmt: skip
    parser.add_argument("-k", help="pytest -k expression, applied to both sides")
    parser.add_argument("--sides", default="persistent,safe")
    parser.add_argument("--timeout", type=int, default=120, help="per-test timeout, seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "upstream_api.md")
    parser.add_argument(
        "--max-examples", type=int, default=0, help="hypothesis examples per test (chromadb: 50)"
    )
    parser.add_argument("--logs", type=Path, help="keep each side's pytest output in this dir")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    if unknown := set(sides) - set(SIDES):
        parser.error(f"unknown sides: {sorted(unknown)}")
    runs = []
    for side in sides:
        print(f"[upstream {time.strftime('%H:%M:%S')}] running {side}", file=sys.stderr)
        run = run_side(side, args.tests, args)
        print(f"[upstream] {side}: {run['summary']} ({run['wall_s']:.1f} s)", file=sys.stderr)
        if not run["results"]:
            print(f"[upstream] {side}: no test outcomes recorded", file=sys.stderr)
            return 2
        # The fixtures must have run on this side's class, and only on it (else the comparison
        # would compare chromadb with itself).
        if set(run["opened"]) != {SIDES[side]}:
            print(f"[upstream] {side}: the fixtures opened {run['opened']}", file=sys.stderr)
            return 2
        runs.append(run)
    diffs = compare(runs[0], runs[1]) if len(runs) == 2 else []
    cmdline = shlex.join(["python", "benchmarks/upstream_api.py", *(argv or sys.argv[1:])])
    text = render(runs, diffs, cmdline)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, "differences": diffs}, indent=1, sort_keys=True) + "\n"
    )
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
