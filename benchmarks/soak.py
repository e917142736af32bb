"""Long chaos soak: the engine of tests/test_chaos.py, run for as long as you like.

    python benchmarks/soak.py --seconds 300 --out benchmarks/results/soak.md

Prints the figures (operations, faults injected and survived, records checked and lost) as a
Markdown table with the environment, and exits non-zero if anything was lost or went wrong.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the engine, and tests/faults.py that it uses

from chaos import FAULT_KINDS, SoakConfig, run_soak  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--ids-per-thread", type=int, default=250)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated subset of {','.join(FAULT_KINDS)}",
    )
    ap.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    args = ap.parse_args()
    cfg = SoakConfig(
        seconds=args.seconds,
        threads=args.threads,
        ids_per_thread=args.ids_per_thread,
        seed=args.seed,
        faults=tuple(f for f in args.faults.split(",") if f),
    )
    with tempfile.TemporaryDirectory(prefix="safechroma-soak-") as tmp:
        report = run_soak(os.path.join(tmp, "db"), cfg)
    import chromadb

    import safechroma

    lines = [
        "# Chaos soak",
        "",
        f"`python benchmarks/soak.py --seconds {args.seconds:g} --seed {args.seed}` on "
        f"{datetime.date.today().isoformat()}: Python {platform.python_version()}, chromadb "
        f"{chromadb.__version__}, safechroma {safechroma.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}.",
        "",
        f"Config: {cfg.threads} workload threads on their own ids ({cfg.ids_per_thread} each, "
        f"dim {cfg.dim}, batches of 1-8), faults {', '.join(cfg.faults)} every "
        f"{cfg.fault_gap[0]}-{cfg.fault_gap[1]} s, client timeout {cfg.call_timeout} s, "
        f"HNSW sync_threshold {cfg.sync_threshold}. Final state read by chromadb in a child "
        "process.",
        "",
        report.markdown(),
        "",
        f"Verdict: {'PASS' if report.passed else 'FAIL'}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
