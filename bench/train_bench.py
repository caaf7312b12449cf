#!/usr/bin/env python3
"""Training and decoding throughput: chingu's CPU backend beside PyTorch on the CPU, same
model (seed-256: 6+6 layers, d 256, 4 heads, d_ff 1024, vocabulary 16,000), same batch (18
pairs of 64 + 64 tokens), AdamW, same thread count, in one run.

usage: bench/train_bench.py [--threads 2] [--steps 10] [--warmup 2] [--rounds 3]

This VM's speed drifts by ±10% within minutes, so the two implementations alternate for
--rounds rounds and the table reports each one's median step time.
Needs torch for the PyTorch column (pip install torch); builds chingu in release mode first.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "chingu")


def run_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs):
    """The run with the median step time."""
    return sorted(runs, key=lambda r: r["step_ms"])[len(runs) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    ours_runs, torch_runs = [], []
    for round_no in range(args.rounds):
        ours_runs.append(run_json([BINARY, "bench-train", *common], env))
        torch_runs.append(run_json([sys.executable, os.path.join(ROOT, "bench", "torch_ref.py"), "bench", "--threads", str(args.threads), *common]))
        print(f"round {round_no + 1}: PyTorch {torch_runs[-1]['tokens_per_s']:,.0f} tokens/s, "
              f"chingu {ours_runs[-1]['tokens_per_s']:,.0f} tokens/s "
              f"({ours_runs[-1]['tokens_per_s'] / torch_runs[-1]['tokens_per_s']:.2f}x)", flush=True)
    ours, torch = median_run(ours_runs), median_run(torch_runs)
    decode = run_json([BINARY, "bench-decode", "--tgt-len", "64"], env)

    print(f"\nseed-256 training step, batch 18 x (64 + 64) tokens, {args.threads} threads, {args.steps} timed steps, median of {args.rounds} alternating rounds\n")
    print("| implementation | parameters | step (ms) | tokens/s | vs PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for r in (torch, ours):
        name = f"PyTorch {r.get('torch', '')} (CPU)" if r["impl"] == "pytorch" else "chingu CPU backend (f32)"
        print(f"| {name} | {r['params']:,} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / torch['tokens_per_s']:.2f}x |")
    print(f"\ngreedy decoding, 64 tokens, seed-256: KV cache {decode['kv_cache_tokens_per_s']:,.1f} tokens/s, "
          f"full recomputation {decode['recompute_tokens_per_s']:,.1f} tokens/s "
          f"({decode['kv_cache_tokens_per_s'] / decode['recompute_tokens_per_s']:.1f}x)")


if __name__ == "__main__":
    main()
