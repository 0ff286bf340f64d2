#!/usr/bin/env python3
"""Plots `holdpoint bench --json` output for the README (needs matplotlib).

    for c in 16 64 256 1024; do holdpoint bench --runs 5000 --concurrency $c --json; done > sweep.jsonl
    python3 scripts/plot_bench.py sweep.jsonl docs/bench.png

Left: runs/s of both phases against in-flight concurrency. Right: the distribution of
decision -> completed latency (sequential decisions) of the run with concurrency 256,
or of the last run if none had it.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    reports = [json.loads(line) for line in open(src) if line.strip()]
    reports.sort(key=lambda r: r["concurrency"])
    conc = [r["concurrency"] for r in reports]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conc, [r["phase1_runs_per_s"] for r in reports], "o-", label="phase 1: start -> waiting")
    left.plot(conc, [r["phase2_runs_per_s"] for r in reports], "s-", label="phase 2: approve -> completed")
    left.set_xscale("log", base=2)
    left.set_xticks(conc, [str(c) for c in conc])
    left.set_xlabel("runs in flight")
    left.set_ylabel("runs/s (durable)")
    left.set_ylim(bottom=0)
    left.set_title("Standard workload, engine API")
    left.grid(alpha=0.3)
    left.legend()
    pick = next((r for r in reports if r["concurrency"] == 256), reports[-1])
    samples = sorted(pick.get("latency_samples_ms", []))
    if samples:
        right.hist(samples, bins=30, color="#1f3a5f")
        for q, style in ((0.5, "--"), (0.99, ":")):
            v = samples[min(len(samples) - 1, round((len(samples) - 1) * q))]
            right.axvline(v, color="#9b1c1c", linestyle=style, label=f"p{int(q * 100)} {v:.2f} ms")
        right.legend()
    right.set_xlabel("decision -> completed (ms)")
    right.set_ylabel("decisions")
    right.set_title(f"Latency, {len(samples)} sequential decisions")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
