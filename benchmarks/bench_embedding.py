"""Embedding throughput of a real transformer: in the caller against in safechroma's worker.

Issue 20 measured embedding in the worker 1.9x slower than in the caller (15.8 s against 8.3 s
for 64 documents): workers inherited the warm template's ``OMP_NUM_THREADS=1``. The worker now
restores the caller's thread variables (``runtime/worker.py`` ``_restore_threads``); this script
checks the result with a real model built here, no download (``_bert_ef.py``: a seeded BERT
encoder, MiniLM-sized, 6 x 384, mean-pooled, registered with ``@register_embedding_function``
so that safechroma sends it to the worker by config and the worker builds its own copy).

Each round embeds N documents (64 of ~100 tokens by default, new text each round) four ways,
in an order that rotates from round to round so that drift on a shared machine hits all alike:

- ``caller``: ``ef(docs)`` in this process;
- ``worker``: the worker's own copy of the function on the same documents
  (``SafeClient.run_in_worker``, timed around the call, so the round trip is included);
- ``safechroma add``: ``SafeClient(dir).get_or_create_collection(..., embedding_function=ef)
  .add(ids, documents=docs)``: chromadb embeds inside the worker, then stores;
- ``chromadb add``: the same on ``chromadb.PersistentClient`` on another directory (embeds in
  this process).

Round 0 warms up every path (the worker builds its model there) and is not kept. The ratios are
worker / caller and safechroma add / chromadb add, on medians and per round. Memory: the
worker's RSS (``SafeClient.stats().worker_rss``) after opening the directory, after the
collection is opened with the function (defined in the worker, model not built yet) and after
the first add (torch imported, model built, one batch run), the caller's RSS, and every other
process safechroma started (the warm template, a standby worker).

Install (a separate venv keeps ``.venv`` lean; torch 2.13.0 is a CPU wheel on this machine's
disk, plain ``pip install torch`` would pull a CUDA build)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e '.[test]' torch==2.13.0 transformers

Run (~3-4 min on a busy 2-core machine; each run is added to ``results/embedding.json`` and
``results/embedding.md`` shows them all, ``--fresh`` starts the list over)::

    .venv-bench/bin/python benchmarks/bench_embedding.py [--docs 64] [--tokens 100] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import _bert_ef  # noqa: E402
import _sysinfo  # noqa: E402
import chromadb  # noqa: E402
from chromadb.config import Settings  # noqa: E402

from safechroma import SafeClient  # noqa: E402

MODES = ("caller", "worker", "safe_add", "plain_add")
LABELS = {
    "caller": "`ef(docs)` in the caller",
    "worker": "`ef(docs)` in the worker (`run_in_worker`)",
    "safe_add": "safechroma `add(documents=)`",
    "plain_add": "chromadb `add(documents=)`",
}
MiB = 2**20
KEPT = "## Reading it"  # a hand-written section of the .md, kept when it is rewritten
_TICK = os.sysconf("SC_CLK_TCK")
_WORDS = [
    "".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 + i % 7))
    for i in range(4000)
]


def documents(n: int, tokens: int, rnd: int) -> list[str]:
    """``n`` texts of ``tokens`` words each (the hash tokenizer adds [CLS] and [SEP])."""
    rng = random.Random(1000 + rnd)
    return [" ".join(rng.choice(_WORDS) for _ in range(tokens - 2)) for _ in range(n)]


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _versions() -> dict[str, Any]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def run(args: argparse.Namespace, work: str) -> dict[str, Any]:
    info = _sysinfo.machine()
    info.update(_versions())
    ef = _bert_ef.BertEF()
    caller_pid = os.getpid()
    rss: dict[str, Any] = {"caller_start": _sysinfo.proc_status(caller_pid).get("VmRSS")}

    # safechroma: the worker's RSS before and after the function and its model reach it.
    safe = SafeClient(os.path.join(work, "safe"))
    safe.heartbeat()
    rss["worker_opened"] = safe.stats().worker_rss
    safe_col = safe.get_or_create_collection("bench", embedding_function=ef)
    rss["worker_with_function"] = safe.stats().worker_rss
    worker_pid = safe.stats().worker_pid
    assert worker_pid is not None

    plain = chromadb.PersistentClient(
        os.path.join(work, "plain"), settings=Settings(anonymized_telemetry=False)
    )
    plain_col = plain.get_or_create_collection("bench", embedding_function=ef)

    docs_of = {r: documents(args.docs, args.tokens, r) for r in range(args.rounds + 1)}

    def op(mode: str, rnd: int) -> Callable[[], Any]:
        docs = docs_of[rnd]
        ids = [f"r{rnd}-{i}" for i in range(len(docs))]
        if mode == "caller":
            return lambda: ef(docs)
        if mode == "worker":
            return lambda: safe.run_in_worker(lambda _c, d: _bert_ef.time_embedding(d), docs)
        if mode == "safe_add":
            return lambda: safe_col.add(ids=ids, documents=docs)
        return lambda: plain_col.add(ids=ids, documents=docs)

    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    caller_calls_in_safe_adds = 0
    t_start = time.perf_counter()
    for rnd in range(args.rounds + 1):  # round 0: warm-up (models built, first batches)
        order = MODES[rnd % len(MODES) :] + MODES[: rnd % len(MODES)]
        for mode in order:
            call = op(mode, rnd)
            calls0 = _bert_ef.CALLS[0]
            c0, w0 = _self_cpu(), _proc_cpu(worker_pid)
            t0 = time.perf_counter()
            result = call()
            wall = time.perf_counter() - t0
            c1, w1 = _self_cpu(), _proc_cpu(worker_pid)
            if mode == "safe_add":
                caller_calls_in_safe_adds += _bert_ef.CALLS[0] - calls0
            if rnd == 0:
                if mode == "safe_add":
                    rss["worker_after_first_add"] = safe.stats().worker_rss
                continue
            row = {"wall": wall, "caller_cpu": c1 - c0, "worker_cpu": w1 - w0}
            if mode == "worker":
                row["inside"] = float(result)
            samples[mode].append(row)
            print(
                f"round {rnd} {mode:9s} {wall:7.3f} s  caller cpu {c1 - c0:6.2f} s  "
                f"worker cpu {w1 - w0:6.2f} s",
                flush=True,
            )
    elapsed = time.perf_counter() - t_start

    threads = {
        "caller": _bert_ef.threads(),
        "worker": safe.run_in_worker(lambda _c: _bert_ef.threads()),
        # the check as a user would write it
        "worker_torch_get_num_threads": safe.run_in_worker(
            lambda _c: __import__("torch").get_num_threads()
        ),
    }
    rss["worker_end"] = safe.stats().worker_rss
    rss["caller_end"] = _sysinfo.proc_status(caller_pid).get("VmRSS")
    rss["caller_hwm"] = _sysinfo.proc_status(caller_pid).get("VmHWM")
    direct_children = set(_sysinfo.children(caller_pid))
    rss["others"] = [
        {
            "pid": pid,
            # the template is started by the caller; workers are forked from it
            "what": "warm template" if pid in direct_children else "standby worker",
            "rss": _sysinfo.proc_status(pid).get("VmRSS"),
        }
        for pid in _sysinfo.descendants(caller_pid)
        if pid != worker_pid and _sysinfo.alive(pid)
    ]
    counts = {"safe": safe_col.count(), "plain": plain_col.count()}
    safe.close()

    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "args": vars(args),
        "machine": info,
        "loadavg_end": os.getloadavg(),
        "elapsed_s": elapsed,
        "samples": samples,
        "rss": rss,
        "threads": threads,
        "counts": counts,
        "caller_calls_in_safe_adds": caller_calls_in_safe_adds,
    }


# -- report --------------------------------------------------------------------------------------


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    s = r["samples"]
    out: dict[str, Any] = {}
    for mode in MODES:
        walls = [x["wall"] for x in s[mode]]
        out[mode] = {
            "median": statistics.median(walls),
            "p95": _pct(walls, 95),
            "min": min(walls),
            "max": max(walls),
            "caller_cpu": statistics.median(x["caller_cpu"] for x in s[mode]),
            "worker_cpu": statistics.median(x["worker_cpu"] for x in s[mode]),
        }
    out["inside"] = statistics.median(x["inside"] for x in s["worker"])
    for name, a, b in (("worker/caller", "worker", "caller"), ("add", "safe_add", "plain_add")):
        per_round = [x["wall"] / y["wall"] for x, y in zip(s[a], s[b], strict=True)]
        out[name] = {
            "ratio": out[a]["median"] / out[b]["median"],
            "paired": statistics.median(per_round),
            "low": min(per_round),
            "high": max(per_round),
        }
    return out


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:.0f} MiB"


def _verdict(ratio: float) -> str:
    return "met" if ratio <= 1.10 else f"missed by {(ratio - 1.10) * 100:.0f} points"


def render(runs: list[dict[str, Any]]) -> str:
    first = runs[-1]
    m = first["machine"]
    a = first["args"]
    lines = [
        "# Embedding in the worker against in the caller (issue 20: thread settings)",
        "",
        f"`.venv-bench/bin/python benchmarks/bench_embedding.py --docs {a['docs']} "
        f"--tokens {a['tokens']} --rounds {a['rounds']}`, run {len(runs)} time(s). "
        "Model: `transformers.BertModel` built here from a seed (6 layers, hidden 384, 6 heads, "
        "intermediate 1536, vocabulary 30522, no pooler; 22.6 M parameters), mean-pooled, "
        "hash tokenizer, no download (`benchmarks/_bert_ef.py`); registered with "
        "`@register_embedding_function`, so safechroma sends it to the worker by config and "
        "the worker builds its own copy. One round embeds the same "
        f"{a['docs']} new documents of {a['tokens']} tokens four ways, the order rotating "
        "each round; round 0 (warm-up, models built) not kept. Seconds per batch.",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"{m['ram_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, chromadb "
        f"{m['chromadb']}, numpy {m['numpy']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, safechroma {m['safechroma']} at {m['git_commit']}"
        + (" (src modified)" if m["src_dirty"] else "")
        + ".",
        "",
        "**Shared machine**: another engineer's test suite ran at the same time (load "
        "averages below, on 2 cores); the rotation spreads that over all four ways, the "
        "per-round range shows what is left of it.",
    ]
    lines += [
        "",
        "| run | load (start, end) | worker / caller (medians; per round) "
        "| safechroma add / chromadb add (medians; per round) | CPU s worker / caller |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        st = summarize(r)
        wc, ad = st["worker/caller"], st["add"]
        lines.append(
            f"| {i} | {r['machine']['loadavg_start'][0]:.1f}, {r['loadavg_end'][0]:.1f} "
            f"| **{wc['ratio']:.3f}**; {wc['paired']:.3f} ({wc['low']:.2f}-{wc['high']:.2f}) "
            f"| **{ad['ratio']:.3f}**; {ad['paired']:.3f} ({ad['low']:.2f}-{ad['high']:.2f}) "
            f"| {st['worker']['worker_cpu'] / st['caller']['caller_cpu']:.3f} |"
        )
    for i, r in enumerate(runs, 1):
        st = summarize(r)
        t = r["threads"]
        rss = r["rss"]
        lines += [
            "",
            f"## Run {i} ({r['when']}; load {r['machine']['loadavg_start'][0]:.2f} at the start, "
            f"{r['loadavg_end'][0]:.2f} at the end; {r['elapsed_s']:.0f} s of rounds)",
            "",
            "| way | median | p95 | min | max | caller CPU | worker CPU |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode in MODES:
            x = st[mode]
            lines.append(
                f"| {LABELS[mode]} | {x['median']:.3f} | {x['p95']:.3f} | {x['min']:.3f} "
                f"| {x['max']:.3f} | {x['caller_cpu']:.2f} | {x['worker_cpu']:.2f} |"
            )
        wc, ad = st["worker/caller"], st["add"]
        lines += [
            "",
            f"- **worker / caller, the function alone: {wc['ratio']:.3f}** (medians; per round "
            f"{wc['paired']:.3f}, from {wc['low']:.3f} to {wc['high']:.3f}); the worker's own "
            f"timer inside the call: {st['inside']:.3f} s (so the round trip is "
            f"{(st['worker']['median'] - st['inside']) * 1e3:.0f} ms). Target <= 1.10: "
            f"{_verdict(wc['ratio'])}.",
            f"- **safechroma add / chromadb add: {ad['ratio']:.3f}** (medians; per round "
            f"{ad['paired']:.3f}, from {ad['low']:.3f} to {ad['high']:.3f}). Target <= 1.10: "
            f"{_verdict(ad['ratio'])}.",
            f"- Threads: caller `torch.get_num_threads()` = {t['caller']['torch_threads']} "
            f"(interop {t['caller']['torch_interop_threads']}), worker = "
            f"{t['worker']['torch_threads']} (interop {t['worker']['torch_interop_threads']}; "
            f"`run_in_worker(lambda c: __import__('torch').get_num_threads())` = "
            f"{t['worker_torch_get_num_threads']}). OMP/OPENBLAS/MKL_NUM_THREADS: caller "
            f"{t['caller']['OMP_NUM_THREADS']}/{t['caller']['OPENBLAS_NUM_THREADS']}/"
            f"{t['caller']['MKL_NUM_THREADS']}, worker {t['worker']['OMP_NUM_THREADS']}/"
            f"{t['worker']['OPENBLAS_NUM_THREADS']}/{t['worker']['MKL_NUM_THREADS']}; "
            f"CPUs allowed: caller {t['caller'].get('cpus')}, worker {t['worker'].get('cpus')}; "
            f"nice: caller {t['caller'].get('nice')}, worker {t['worker'].get('nice')}.",
            f"- Where the embedding ran: the caller's function was called "
            f"{r['caller_calls_in_safe_adds']} times during the safechroma adds; the worker "
            f"built {t['worker']['models']} model and ran the function {t['worker']['calls']} "
            f"times ({r['args']['rounds'] + 1} adds + {r['args']['rounds'] + 1} direct calls). "
            f"Records: safechroma {r['counts']['safe']}, chromadb {r['counts']['plain']}.",
            f"- CPU seconds (user + system, all threads) per batch, less sensitive to the other "
            f"load than wall time: worker {st['worker']['worker_cpu']:.2f} against caller "
            f"{st['caller']['caller_cpu']:.2f} (ratio "
            f"{st['worker']['worker_cpu'] / st['caller']['caller_cpu']:.3f}); safechroma add "
            f"{st['safe_add']['worker_cpu'] + st['safe_add']['caller_cpu']:.2f} (worker + "
            f"caller) against chromadb add {st['plain_add']['caller_cpu']:.2f}.",
            "",
            "| memory (RSS) | |",
            "|---|---|",
            f"| worker, directory open | {_mib(rss['worker_opened'])} |",
            f"| worker, collection opened with the function (model not built yet) "
            f"| {_mib(rss['worker_with_function'])} |",
            f"| worker, after the first add (torch imported, model built) "
            f"| {_mib(rss['worker_after_first_add'])} |",
            f"| worker, at the end | {_mib(rss['worker_end'])} |",
            f"| **worker's extra memory for the model** (end - directory open) "
            f"| **{_mib(rss['worker_end'] - rss['worker_opened'])}** |",
            f"| caller, at the start (torch imported, no model) | {_mib(rss['caller_start'])} |",
            f"| caller, at the end (its model, chromadb's client) | {_mib(rss['caller_end'])} "
            f"(peak {_mib(rss['caller_hwm'])}) |",
        ]
        for o in rss["others"]:
            lines.append(f"| safechroma's {o['what']} (pid {o['pid']}) | {_mib(o['rss'])} |")
    lines += [
        "",
        "The caller's RSS includes chromadb's in-process client for the comparison; a program "
        "using only safechroma would not have it. These numbers are a baseline for this "
        "machine, not a CI gate.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per document")
    parser.add_argument("--rounds", type=int, default=8, help="rounds kept, after one warm-up")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--fresh", action="store_true", help="forget earlier runs")
    args = parser.parse_args()
    out = Path(args.out)
    work = tempfile.mkdtemp(prefix="bench-embedding-")
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    store = out / "embedding.json"
    runs: list[dict[str, Any]] = []
    if store.exists() and not args.fresh:
        runs = json.loads(store.read_text()).get("runs", [])
    runs.append(result)
    store.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    md = out / "embedding.md"
    kept = ""
    if md.exists() and not args.fresh:  # a section added by hand after the generated ones
        old = md.read_text()
        if KEPT in old:
            kept = "\n" + old[old.index(KEPT) :]
    md.write_text(render(runs) + kept)
    st = summarize(result)
    t = result["threads"]
    print(
        f"torch.get_num_threads(): caller {t['caller']['torch_threads']}, worker "
        f"{t['worker']['torch_threads']} (run_in_worker lambda: "
        f"{t['worker_torch_get_num_threads']})"
    )
    print(
        f"worker/caller {st['worker/caller']['ratio']:.3f}, "
        f"safechroma add/chromadb add {st['add']['ratio']:.3f}; wrote {out / 'embedding.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
