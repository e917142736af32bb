"""Turn raw timings into statistics, target verdicts, and results.md, .json and .png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from _workload import OPS, THROUGHPUT_LABELS, THROUGHPUT_OPS

MODE_ORDER = ("direct", "safechroma", "http", "process-per-call")
SMALL_OPS = ("count", "get_ids10")
VS_HTTP_OPS = ("heartbeat", "count", "get_ids10", "query1")
MiB = 2**20
# In-process heartbeat() is a local function call (~0.3 us): a ratio to it means nothing.
NO_RATIO = ("heartbeat",)


def _summ(ns: list[int]) -> dict[str, Any]:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    return {
        "n": int(a.size),
        "median_ms": float(np.median(a)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def _round_ratios(
    mode_rounds: dict[int, list[int]], direct_rounds: dict[int, list[int]]
) -> list[float]:
    """Per round: this mode's median in the round / direct's median in that round."""
    return [
        float(np.median(v) / np.median(direct_rounds[r]))
        for r, v in sorted(mode_rounds.items())
        if v and direct_rounds.get(r)
    ]


def analyse(results: dict[str, Any], raw: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Fill results with per-op statistics, transport, bulk, start-up, crash, RSS and targets."""
    ops: dict[str, Any] = {}
    for op in OPS:
        per_mode = raw.get(op.name, {})
        direct = per_mode.get("direct")
        d_med = float(np.median(direct["ns"])) / 1e6 if direct and direct.get("ns") else None
        entry: dict[str, Any] = {"label": op.label, "slow": op.slow, "modes": {}}
        for mode in MODE_ORDER:
            slot = per_mode.get(mode)
            if not slot or not slot.get("ns"):
                continue
            s = _summ(slot["ns"])
            s["samples_ms"] = [round(x / 1e6, 4) for x in slot["ns"]]
            if d_med:
                s["ratio_to_direct"] = s["median_ms"] / d_med
                s["added_ms"] = s["median_ms"] - d_med
                if mode != "direct" and direct:
                    rr = _round_ratios(slot["rounds"], direct["rounds"])
                    if rr:
                        s["paired_ratio_to_direct"] = float(np.median(rr))
                        s["round_ratios"] = [round(x, 4) for x in rr]
            if mode == "safechroma" and slot.get("transport_ns"):
                t = np.asarray(slot["transport_ns"], dtype=np.float64) / 1e3
                s["transport_us"] = {
                    "median": float(np.median(t)),
                    "p95": float(np.percentile(t, 95)),
                    "share_of_round_trip": float(np.median(t) / (s["median_ms"] * 1e3)),
                }
            if mode == "process-per-call" and slot.get("exit_ns"):
                s["until_exit"] = _summ(slot["exit_ns"])
                bd = slot.get("breakdown") or []
                if bd:
                    s["inside_ms"] = {
                        k[:-3]: float(np.median([b[k] for b in bd])) / 1e6
                        for k in ("start_to_request_ns", "import_chromadb_ns", "open_ns", "call_ns")
                    }
                    s["peak_rss_mib"] = float(np.median([b["vmhwm"] for b in bd])) / MiB
                    s["net_attempts"] = sorted({a for b in bd for a in b["net_attempts"]})
            entry["modes"][mode] = s
        ops[op.name] = entry
    results["ops"] = ops
    results["bulk"] = _bulk(raw)
    results["summary"] = _summaries(results)
    results["targets"] = _targets(results)


def _bulk(raw: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """GB/s of arrays through safechroma's transport: bytes / (round trip - worker time)."""
    out: dict[str, Any] = {}
    for op_name, direction in (
        ("get_bulk_emb", "worker->caller"),
        ("get_limit100_emb", "worker->caller"),
        ("add1536", "caller->worker"),
        ("upsert1536", "caller->worker"),
        ("add384", "caller->worker"),
    ):
        slot = raw.get(op_name, {}).get("safechroma")
        if not slot or not slot.get("transport_ns"):
            continue
        moved = slot["bytes_out"] if direction == "worker->caller" else slot["payload"]
        rates = [
            b / t for b, t in zip(moved, slot["transport_ns"], strict=False) if t > 0 and b > 0
        ]  # B/ns = GB/s
        if not rates:
            continue
        out[op_name] = {
            "direction": direction,
            "mib_per_call": float(np.median(moved)) / MiB,
            "gb_per_s_median": float(np.median(rates)),
            "gb_per_s_p5": float(np.percentile(rates, 5)),
            "n": len(rates),
        }
    return out


def _summaries(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    st = results.get("startup")
    if st and st.get("open_to_first_count_ns"):
        out["startup"] = {
            "safechroma_open_to_first_count": _summ(st["open_to_first_count_ns"]),
            "safechroma_close": _summ(st["close_ns"]),
        }
    opened = results.get("open", {})
    out.setdefault("startup", {})["first_open_in_run_ms"] = {
        m: v["open_to_first_count_ns"] / 1e6
        for m, v in opened.items()
        if "open_to_first_count_ns" in v
    }
    if "http" in opened and "server_listen_ns" in opened["http"]:
        out["startup"]["http_server_listen_ms"] = opened["http"]["server_listen_ns"] / 1e6
    crash = results.get("crash")
    if crash and crash.get("trials"):
        ns = [t["ns"] for t in crash["trials"]]
        out["crash"] = {
            **_summ(ns),
            "all_answered": all(t["answered"] is not None for t in crash["trials"]),
            "new_worker_each_time": all(
                t["new_pid"] not in (None, t["old_pid"]) for t in crash["trials"]
            ),
            "calls_that_raised": sum(len(t["errors_before_answer"]) for t in crash["trials"]),
        }
    rss = results.get("rss", {})
    mem: dict[str, Any] = {}
    for mode, r in rss.items():
        row: dict[str, Any] = {
            "caller_mib": r["caller"].get("VmRSS", 0) / MiB,
            "caller_peak_mib": r["caller"].get("VmHWM", 0) / MiB,
            "caller_at_start_mib": r.get("start", {}).get("VmRSS", 0) / MiB,
        }
        kids = r.get("children", [])
        if kids:
            row["children"] = [
                {
                    "role": k["role"],
                    "mib": k.get("VmRSS", 0) / MiB,
                    "peak_mib": k.get("VmHWM", 0) / MiB,
                    "cmd": k["cmd"],
                }
                for k in kids
            ]
            row["children_total_mib"] = sum(k.get("VmRSS", 0) for k in kids) / MiB
        if "server" in r:
            row["server_mib"] = r["server"].get("VmRSS", 0) / MiB
            row["server_peak_mib"] = r["server"].get("VmHWM", 0) / MiB
        mem[mode] = row
    ppc = results.get("ops", {}).get("count", {}).get("modes", {}).get("process-per-call")
    if ppc and "peak_rss_mib" in ppc:
        mem.setdefault("process-per-call", {})["per_call_process_peak_mib"] = ppc["peak_rss_mib"]
    out["memory"] = mem
    return out


def _target(
    tid: str, what: str, measured: float | None, goal: float, unit: str, upper: bool, note: str = ""
) -> dict[str, Any]:
    """A target verdict; ``upper`` means measured must be <= goal, else >= goal."""
    t: dict[str, Any] = {
        "id": tid,
        "what": what,
        "goal": goal,
        "unit": unit,
        "rule": "<=" if upper else ">=",
        "measured": measured,
        "note": note,
    }
    if measured is None:
        t["verdict"] = "N/A"
        t["margin"] = "not measured"
        return t
    ok = measured <= goal if upper else measured >= goal
    t["verdict"] = "PASS" if ok else "MISS"
    diff = goal - measured if upper else measured - goal
    rel = diff / goal * 100 if goal else 0.0
    word = "under" if upper else "over"
    if ok:
        t["margin"] = f"{_fmt(abs(diff), unit)} {word} the goal ({abs(rel):.0f}% headroom)"
    else:
        t["margin"] = f"missed by {_fmt(abs(diff), unit)} ({abs(rel):.0f}%)"
    return t


def _fmt(v: float, unit: str) -> str:
    if unit == "x":
        return f"{v:.3f}x"
    if unit == "%":
        return f"{v:.1f} pts"
    return f"{v:.3g} {unit}"


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ops = results.get("ops", {})
    out: list[dict[str, Any]] = []

    def mode(op: str, m: str) -> dict[str, Any] | None:
        return ops.get(op, {}).get("modes", {}).get(m)

    for op in SMALL_OPS:
        s = mode(op, "safechroma")
        tr = s["transport_us"]["median"] if s and "transport_us" in s else None
        out.append(
            _target(
                f"transport_{op}",
                f"transport cost of {ops[op]['label']} (median)",
                tr,
                100.0,
                "us",
                True,
            )
        )
    for op, goal in (("query1", 10.0), ("add384", 3.0), ("add1536", 3.0)):
        s = mode(op, "safechroma")
        slower = (s["ratio_to_direct"] - 1) * 100 if s and "ratio_to_direct" in s else None
        paired = s.get("paired_ratio_to_direct") if s else None
        note = ""
        if paired:
            rr = s["round_ratios"]
            note = (
                f"paired per-round ratio {(paired - 1) * 100:+.1f}%, rounds range "
                f"{(min(rr) - 1) * 100:+.1f}% .. {(max(rr) - 1) * 100:+.1f}% (n={len(rr)})"
            )
        out.append(
            _target(
                f"slowdown_{op}",
                f"{ops[op]['label']} slower than direct (median)",
                slower,
                goal,
                "%",
                True,
                note,
            )
        )
    # HttpClient's added latency over direct, divided by safechroma's. safechroma's is its
    # transport cost, measured call by call (what it adds: the Chroma work is the same); http's
    # can only be read as median(http) - median(direct). The median difference for safechroma is
    # in the note: on ops where Chroma's own time dominates it is mostly noise.
    tot_h = tot_s = 0.0
    for op in VS_HTTP_OPS:
        s, h = mode(op, "safechroma"), mode(op, "http")
        if not (s and h and "transport_us" in s and "added_ms" in h):
            continue
        s_added = s["transport_us"]["median"] / 1e3
        tot_h += h["added_ms"]
        tot_s += s_added
        out.append(
            _target(
                f"vs_http_{op}",
                f"HttpClient added latency / safechroma's, {ops[op]['label']}",
                h["added_ms"] / s_added,
                5.0,
                "x",
                False,
                f"http +{h['added_ms'] * 1e3:.0f} us; safechroma transport {s_added * 1e3:.0f} us "
                f"(median difference to direct {s.get('added_ms', 0) * 1e3:+.0f} us)",
            )
        )
    if tot_s:
        out.append(
            _target(
                "vs_http_small",
                "HttpClient added latency / safechroma's, sum of the "
                f"{len(VS_HTTP_OPS)} small calls",
                tot_h / tot_s,
                5.0,
                "x",
                False,
                f"http +{tot_h * 1e3:.0f} us, safechroma +{tot_s * 1e3:.0f} us",
            )
        )
    bulk = results.get("bulk", {})
    for op in ("get_bulk_emb", "add1536"):
        b = bulk.get(op)
        out.append(
            _target(
                f"bulk_{op}",
                f"bulk arrays, {b['direction'] if b else op}: {ops.get(op, {}).get('label', op)}",
                b["gb_per_s_median"] if b else None,
                2.0,
                "GB/s",
                False,
                f"{b['mib_per_call']:.1f} MiB per call" if b else "",
            )
        )
    crash = results.get("summary", {}).get("crash")
    out.append(
        _target(
            "crash_to_served",
            "SIGKILLed worker replaced, next count() answered (max of trials)",
            crash["max_ms"] / 1e3 if crash else None,
            0.3,
            "s",
            True,
            f"median {crash['median_ms']:.0f} ms over {crash['n']} trials" if crash else "",
        )
    )
    return out


# --- output ------------------------------------------------------------------------------------


def _ms(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    modes = [x for x in MODE_ORDER if any(x in o["modes"] for o in results["ops"].values())]
    L: list[str] = []
    L.append("# safechroma benchmark results\n")
    L.append(f"Command: `{cfg['command']}`  ")
    L.append(
        f"Run: {results.get('finished', '')}, {results['duration_seconds']:.0f} s; "
        f"{cfg['records']} records per collection, {cfg['rounds']} rounds, "
        f"{cfg['reps_fast_ops']} calls per mode per round for fast ops; slow ops (bulk get, add, "
        f"upsert) once per mode in {cfg['slow_rounds']} round(s); process-per-call in "
        f"{cfg['ppc_rounds']} round(s) ({cfg['ppc_reps_fast_ops']} calls per fast op).\n"
    )
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    for k in (
        "cpu_model",
        "logical_cpus",
        "usable_cpus",
        "ram_gib",
        "kernel",
        "python",
        "chromadb",
        "numpy",
        "safechroma",
        "git_commit",
        "src_dirty",
        "loadavg_start",
        "loadavg_end",
    ):
        v = m.get(k)
        if isinstance(v, (list, tuple)):
            v = " / ".join(f"{x:.2f}" for x in v)
        L.append(f"| {k} | {v} |")
    L.append("")
    if results.get("skipped_modes"):
        L.append(
            "Skipped modes: "
            + "; ".join(f"{k}: {v}" for k, v in results["skipped_modes"].items())
            + "\n"
        )

    L.append("## Targets (issue 5)\n")
    L.append("| target | measured | goal | verdict | margin | note |\n|---|---|---|---|---|---|")
    for t in results["targets"]:
        meas = (
            "—"
            if t["measured"] is None
            else ("inf" if t["measured"] == float("inf") else _fmt(t["measured"], t["unit"]))
        )
        if t["unit"] == "%" and t["measured"] is not None:
            meas = f"{t['measured']:+.1f}%"
        goal = f"{t['rule']} {t['goal']:g}{'%' if t['unit'] == '%' else ' ' + t['unit']}"
        L.append(
            f"| {t['what']} | {meas} | {goal} | **{t['verdict']}** | {t['margin']} | {t['note']} |"
        )
    L.append("")

    L.append("## Latency per operation\n")
    L.append(
        "Milliseconds, median / p95, measured by the caller around the bare call. "
        "`x` = median / direct median (none for heartbeat: in-process it is a local call).\n"
    )
    head = "| operation | " + " | ".join(modes) + " |"
    L.append(head)
    L.append("|---|" + "---|" * len(modes))
    for op in OPS:
        e = results["ops"].get(op.name)
        if not e:
            continue
        cells = []
        for mode in modes:
            s = e["modes"].get(mode)
            if not s:
                cells.append("—")
                continue
            c = f"{_ms(s['median_ms'])} / {_ms(s['p95_ms'])}"
            if mode != "direct" and "ratio_to_direct" in s and op.name not in NO_RATIO:
                c += f" ({s['ratio_to_direct']:.2f}x)"
            cells.append(c)
        L.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    L.append("")
    ns = {
        op.name: results["ops"][op.name]["modes"].get("direct", {}).get("n")
        for op in OPS
        if op.name in results["ops"]
    }
    L.append("Samples per mode: " + ", ".join(f"{k} {v}" for k, v in ns.items() if v) + ".\n")

    sc = {
        op.name: results["ops"][op.name]["modes"].get("safechroma")
        for op in OPS
        if op.name in results["ops"]
    }
    if any(s and "transport_us" in s for s in sc.values()):
        L.append("## safechroma: transport cost alone\n")
        L.append(
            "Round trip measured by the caller minus `stats().last_call_worker_seconds` "
            "(time inside the worker), per call.\n"
        )
        L.append(
            "| operation | median us | p95 us | share of round trip | added vs direct (median) |"
        )
        L.append("|---|---|---|---|---|")
        for op in OPS:
            s = sc.get(op.name)
            if not s or "transport_us" not in s:
                continue
            t = s["transport_us"]
            added = f"{s['added_ms'] * 1e3:+.0f} us" if "added_ms" in s else "—"
            L.append(
                f"| {op.label} | {t['median']:.0f} | {t['p95']:.0f} | "
                f"{t['share_of_round_trip'] * 100:.1f}% | {added} |"
            )
        L.append("")
    if results.get("bulk"):
        L.append("## safechroma: bulk arrays\n")
        L.append(
            "Bytes of embeddings moved / transport time (round trip − worker time), per call. "
            "`get` returns float64 arrays in chromadb 1.5.9; `add` sends float32.\n"
        )
        L.append(
            "| operation | direction | MiB per call | GB/s median | GB/s p5 "
            "|\n|---|---|---|---|---|"
        )
        for op_name, b in results["bulk"].items():
            L.append(
                f"| {results['ops'][op_name]['label']} | {b['direction']} | "
                f"{b['mib_per_call']:.2f} | "
                f"{b['gb_per_s_median']:.2f} | {b['gb_per_s_p5']:.2f} |"
            )
        L.append("")

    summ = results.get("summary", {})
    L.append("## Start-up and crash recovery\n")
    su = summ.get("startup", {})
    L.append("| what | median | max | n |\n|---|---|---|---|")
    if "safechroma_open_to_first_count" in su:
        s = su["safechroma_open_to_first_count"]
        L.append(
            "| safechroma: `SafeClient(path)` to first answered `count()` | "
            f"{_ms(s['median_ms'])} ms | "
            f"{_ms(s['max_ms'])} ms | {s['n']} |"
        )
        s = su["safechroma_close"]
        L.append(
            f"| safechroma: `close()` | {_ms(s['median_ms'])} ms | {_ms(s['max_ms'])} ms | "
            f"{s['n']} |"
        )
    for mode, v in su.get("first_open_in_run_ms", {}).items():
        L.append(
            f"| {mode}: first client open to first `count()` in this run (cold) | {_ms(v)} ms | | "
            "1 |"
        )
    if "http_server_listen_ms" in su:
        L.append(
            f"| http: `chroma run` spawned to listening | {_ms(su['http_server_listen_ms'])} ms | "
            "| 1 |"
        )
    ppc = results["ops"].get("count", {}).get("modes", {}).get("process-per-call")
    if ppc:
        L.append(
            f"| process-per-call: spawn to answered `count()` | {_ms(ppc['median_ms'])} ms | "
            f"{_ms(ppc['max_ms'])} ms | {ppc['n']} |"
        )
    cr = summ.get("crash")
    if cr:
        L.append(
            f"| safechroma: worker SIGKILLed to next `count()` answered | {_ms(cr['median_ms'])} "
            "ms | "
            f"{_ms(cr['max_ms'])} ms | {cr['n']} |"
        )
    L.append("")
    if cr:
        L.append(
            f"Crash trials: all answered: {cr['all_answered']}; a new worker each time: "
            f"{cr['new_worker_each_time']}; calls that raised before the answer: "
            f"{cr['calls_that_raised']}.\n"
        )

    mem = summ.get("memory", {})
    if mem:
        L.append("## Resident memory (steady state, after the rounds)\n")
        L.append(
            "| mode | caller RSS MiB (at start) | caller peak | other processes, RSS MiB "
            "|\n|---|---|---|---|"
        )
        for mode in MODE_ORDER:
            r = mem.get(mode)
            if not r or "caller_mib" not in r:
                continue
            others = []
            for k in r.get("children", []):
                others.append(f"{k['role']} {k['mib']:.0f} (peak {k['peak_mib']:.0f})")
            if "server_mib" in r:
                others.append(f"chroma run {r['server_mib']:.0f} (peak {r['server_peak_mib']:.0f})")
            if "per_call_process_peak_mib" in r:
                others.append(
                    f"each per-call process peaks at {r['per_call_process_peak_mib']:.0f}"
                )
            L.append(
                f"| {mode} | {r['caller_mib']:.0f} ({r['caller_at_start_mib']:.0f}) | "
                f"{r['caller_peak_mib']:.0f} | {'; '.join(others) or '—'} |"
            )
        L.append("")
        L.append(
            "Every caller holds the same generated arrays; 'at start' is the driver before it "
            "imported its client library.\n"
        )

    if ppc and "inside_ms" in ppc:
        L.append("## Process-per-call: where the time goes (count)\n")
        ins = ppc["inside_ms"]
        L.append(
            f"Interpreter start {_ms(ins['start_to_request'])} ms, `import chromadb` "
            f"{_ms(ins['import_chromadb'])} ms, open client + collection {_ms(ins['open'])} ms, "
            f"the call {_ms(ins['call'])} ms; answer at {_ms(ppc['median_ms'])} ms, process exit "
            "at "
            f"{_ms(ppc['until_exit']['median_ms'])} ms (medians).\n"
        )

    net = results.get("network", {})
    if net:
        L.append("## Network check\n")
        for who, v in net.items():
            bad = v.get("non_loopback_sockets", [])
            att = v.get("client_non_loopback_attempts")
            line = f"- {who}: non-loopback sockets open at the end of the rounds: {len(bad)}"
            if att is not None:
                line += (
                    "; non-loopback connect/resolve attempts by the client (audit hook): "
                    f"{len(att)}"
                )
            L.append(line)
        attempts = {
            a
            for o in results["ops"].values()
            for a in o["modes"].get("process-per-call", {}).get("net_attempts", [])
        }
        if "process-per-call" in modes:
            L.append(
                f"- process-per-call children: non-loopback attempts (audit hook): {len(attempts)}"
            )
        sd = results.get("shutdown", {}).get("http-server")
        if sd:
            L.append(
                f"- `chroma run` stopped: exit code {sd.get('returncode')}, port closed: "
                f"{sd.get('port_closed')}, process gone: {sd.get('process_gone')}"
            )
        L.append(
            f"- processes left behind by the suite: {len(results.get('leftover_children', []))}"
        )
        sc_close = results.get("safechroma_close")
        if sc_close:
            L.append(
                f"- safechroma `close()`: children left 5 s after it returned: "
                f"{len(sc_close.get('children_left_after_close', []))}"
            )
        L.append("")

    L.append("## Method\n")
    L.append(
        "- Each mode runs in a driver process of its own (spawned; the benchmark process never "
        "imports "
        "chromadb), on its own copy of one data set: two collections of N records (384 and 1536 "
        "dims, "
        "random float32, a short document and metadata per record). `direct` is "
        "`chromadb.PersistentClient` inside its driver and the timer wraps the bare Chroma call, "
        "so it "
        "is what in-process Chroma costs. `safechroma` is `SafeClient` in its driver (the "
        "caller) with "
        "the worker as the driver's child. `http` is `chromadb.HttpClient` to a `chroma run` on "
        "127.0.0.1 started and stopped by the suite. `process-per-call` spawns a fresh "
        "interpreter per "
        "call that imports chromadb, opens the PersistentClient and makes the call; its latency is "
        "spawn to answer received (exit comes later and is reported above).\n"
        "- Round by round, each operation runs in every mode in turn, the first mode rotating "
        "each round; "
        "fast operations run several times per mode per round, slow ones (bulk get, add, upsert) "
        "once. "
        "Every mode receives the same ids and arrays in the same round. Warm-up before the "
        "rounds.\n"
        "- `add` and `upsert` use 1000 fresh ids that are deleted (untimed) right after, so "
        "collection "
        "sizes stay comparable between modes (each leaves deleted HNSW slots behind, alike in "
        "every "
        "mode). `upsert` of existing ids takes HNSW's update path: 5-24 s per call at 10k "
        "records on "
        "this machine, too slow for the time budget, and the bytes moved are the same.\n"
        "- Ratios are of medians. The paired ratio (median over rounds of the per-round ratio) "
        "is in "
        "results.json and in the target notes. Telemetry is off everywhere; embeddings are always "
        "explicit.\n"
    )
    L += throughput_markdown(results)
    if results.get("errors"):
        L.append("## Errors\n")
        for e in results["errors"]:
            L.append("```\n" + e[:3000] + "\n```")
    return "\n".join(L) + "\n"


def throughput_markdown(results: dict[str, Any]) -> list[str]:
    """The throughput tables and the fresh-directory open times (issue 10)."""
    tp = results.get("throughput")
    if not tp:
        return []
    modes = tp["modes"]
    secs = results["config"].get("throughput_seconds")
    L = ["## Throughput: many callers at once\n"]
    L.append(
        f"Calls completed per second with N callers calling at once in a loop for {secs} s per "
        "cell (the modes take turns within a cell). Threads share one client; asyncio tasks use "
        "the mode's async face: `asyncio.to_thread` over `PersistentClient` for direct (chromadb "
        "has no local async client), `AsyncSafeClient` for safechroma, `AsyncHttpClient` for "
        "http. In parentheses: the ratio to direct in the same cell.\n"
    )
    for kind, title in (("threads", "threads"), ("tasks", "asyncio tasks")):
        L.append(f"### {title}\n")
        L.append("| op | " + title + " | " + " | ".join(f"{m} /s" for m in modes) + " |")
        L.append("|---|---|" + "---|" * len(modes))
        for op in THROUGHPUT_OPS:
            for n, cell in sorted(tp[kind].get(op, {}).items(), key=lambda kv: int(kv[0])):
                base = cell.get("direct", {}).get("per_s")
                parts = []
                for m in modes:
                    v = cell.get(m, {}).get("per_s")
                    if v is None:
                        parts.append("-")
                    elif m == "direct" or not base:
                        parts.append(f"{v:.0f}")
                    else:
                        parts.append(f"{v:.0f} ({v / base:.2f}x)")
                errs = sum(len(cell.get(m, {}).get("errors", [])) for m in modes)
                note = f" ({errs} errors)" if errs else ""
                L.append(f"| {THROUGHPUT_LABELS[op]}{note} | {n} | " + " | ".join(parts) + " |")
        L.append("")
    fresh = results.get("fresh_open") or {}
    if fresh:
        L.append("### Opening a fresh directory\n")
        L.append(
            "A new, empty directory opened by a process that already has a client open "
            "(`PersistentClient(path)` or `SafeClient(path)`), to the first answered "
            "`count_collections()`. safechroma's worker is forked from the process-wide warm "
            "template; the target is max(4x direct, 120 ms).\n"
        )
        L.append("| mode | median ms | max ms | trials |\n|---|---|---|---|")
        meds = {}
        for mode, r in fresh.items():
            ms = np.asarray(r["open_to_first_answer_ns"]) / 1e6
            meds[mode] = float(np.median(ms))
            L.append(f"| {mode} | {meds[mode]:.1f} | {ms.max():.1f} | {len(ms)} |")
        if "direct" in meds and "safechroma" in meds:
            target = max(4 * meds["direct"], 120.0)
            ok = "met" if meds["safechroma"] <= target else "missed"
            L.append(
                f"\nTarget {ok}: safechroma median {meds['safechroma']:.1f} ms against "
                f"max(4 x {meds['direct']:.1f}, 120) = {target:.1f} ms.\n"
            )
    return L


def throughput_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = results["throughput"]
    modes = tp["modes"]
    colors = {"direct": "#4c72b0", "safechroma": "#55a868", "http": "#c44e52"}
    fig, axes = plt.subplots(1, len(THROUGHPUT_OPS), figsize=(15, 4.8))
    for ax, op in zip(axes, THROUGHPUT_OPS, strict=True):
        cells = [
            (f"{n} thr", c)
            for n, c in sorted(tp["threads"].get(op, {}).items(), key=lambda kv: int(kv[0]))
        ]
        cells += [
            (f"{n} tasks", c)
            for n, c in sorted(tp["tasks"].get(op, {}).items(), key=lambda kv: int(kv[0]))
        ]
        x = np.arange(len(cells))
        width = 0.8 / max(1, len(modes))
        for i, m in enumerate(modes):
            vals = [c.get(m, {}).get("per_s", np.nan) for _, c in cells]
            ax.bar(
                x + (i - (len(modes) - 1) / 2) * width, vals, width, label=m, color=colors.get(m)
            )
        ax.set_xticks(x, [label for label, _ in cells], rotation=30, ha="right", fontsize=8)
        ax.set_title(THROUGHPUT_LABELS[op], fontsize=10)
        ax.set_ylabel("calls / s")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"throughput with many callers, {results['config']['records']} records — "
        f"{m['cpu_model']}, {m['usable_cpus']} CPUs, chromadb {m['chromadb']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [x for x in MODE_ORDER if any(x in o["modes"] for o in results["ops"].values())]
    ops = [op for op in OPS if op.name in results["ops"]]
    colors = {
        "direct": "#4c72b0",
        "safechroma": "#55a868",
        "http": "#c44e52",
        "process-per-call": "#8172b2",
    }
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 9), gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / len(modes)
    x = np.arange(len(ops))
    for i, mode in enumerate(modes):
        med = [
            results["ops"][op.name]["modes"].get(mode, {}).get("median_ms", np.nan) for op in ops
        ]
        p95 = [results["ops"][op.name]["modes"].get(mode, {}).get("p95_ms", np.nan) for op in ops]
        err = [
            np.nan_to_num(np.asarray(p95) - np.asarray(med)) * 0,
            np.nan_to_num(np.asarray(p95) - np.asarray(med)),
        ]
        ax1.bar(
            x + (i - (len(modes) - 1) / 2) * width,
            med,
            width,
            yerr=err,
            capsize=2,
            label=mode,
            color=colors[mode],
        )
        if mode != "direct":
            ratio = [
                np.nan
                if op.name in NO_RATIO
                else results["ops"][op.name]["modes"].get(mode, {}).get("ratio_to_direct", np.nan)
                for op in ops
            ]
            ax2.bar(
                x + (i - (len(modes) - 1) / 2) * width, ratio, width, color=colors[mode], label=mode
            )
    ax1.set_yscale("log")
    ax1.set_ylabel("latency, ms (median; whisker: p95)")
    ax1.set_xticks(x, [op.label for op in ops], rotation=20, ha="right", fontsize=8)
    ax1.legend(fontsize=8)
    m = results["machine"]
    ax1.set_title(
        f"safechroma vs alternatives, {results['config']['records']} records — "
        f"{m['cpu_model']}, {m['usable_cpus']} CPUs, chromadb {m['chromadb']}",
        fontsize=10,
    )
    ax1.grid(axis="y", which="both", alpha=0.3)
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("median / direct median")
    ax2.set_title("ratio to direct (none for heartbeat: in-process it is a local call)", fontsize=9)
    ax2.set_xticks(x, [op.label for op in ops], rotation=20, ha="right", fontsize=8)
    ax2.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(v: Any) -> Any:
    """Strict JSON: a non-finite float (an infinite ratio) becomes null."""
    if isinstance(v, float):
        return v if np.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_outputs(results: dict[str, Any], out: Path, chart_too: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    paths = {"md": out / "results.md", "json": out / "results.json"}
    paths["json"].write_text(
        json.dumps(_finite(results), indent=1, default=str, allow_nan=False) + "\n"
    )
    paths["md"].write_text(markdown(results))
    if chart_too:
        paths["png"] = out / "results.png"
        chart(results, paths["png"])
        if results.get("throughput"):
            paths["throughput_png"] = out / "throughput.png"
            throughput_chart(results, paths["throughput_png"])
    return paths
