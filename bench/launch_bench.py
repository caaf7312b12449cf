#!/usr/bin/env python3
"""Data-parallel CPU training through `chingu launch`: 1 worker vs 2 workers on this machine,
same global batch, same steps. Reports tokens/s, the all-reduce's time per step and the part of
it hidden behind the backward pass, and the coordinator's own CPU time per step as a share of
the step time.

usage: bench/launch_bench.py [--preset tiny] [--steps 300] [--global-batch-tokens 2048] [--data prepared]
Builds chingu in release mode first; prepares the embedded corpus into --data if it is missing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "chingu")


def run_job(tmp, data, preset, steps, workers, batch_tokens, threads):
    run = os.path.join(tmp, f"run-{workers}")
    manifest = os.path.join(tmp, f"bench-{workers}.toml")
    with open(manifest, "w") as f:
        f.write(f"""[job]
name = "bench-{workers}"
run = "{run}"
[data]
path = "{data}"
[model]
preset = "{preset}"
[train]
steps = {steps}
batch_tokens = {batch_tokens}
eval_every = 0
threads = {threads}
[workers]
count = {workers}
backend = "cpu"
[checkpoint]
every_steps = 0
""")
    out = subprocess.run([BINARY, "launch", "--samples", "0", manifest], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"launch failed:\n{out.stderr[-3000:]}")
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    timed = metrics[min(10, len(metrics) // 5):]
    cpu_s = None
    for line in open(os.path.join(run, "logs", "coordinator.jsonl")):
        event = json.loads(line)
        if event["fields"].get("message") == "coordinator done":
            cpu_s = event["fields"]["cpu_s"]
    step_s = statistics.median(m["step_s"] for m in timed)
    allreduce = statistics.median(m["allreduce_s"] for m in timed)
    exposed = statistics.median(m["allreduce_exposed_s"] for m in timed)
    return {
        "workers": workers,
        "tokens_per_s": sum(m["tokens_per_s"] for m in timed) / len(timed),
        "step_ms": step_s * 1e3,
        "allreduce_ms": allreduce * 1e3,
        "exposed_ms": exposed * 1e3,
        "hidden": (1 - exposed / allreduce) if allreduce > 0 else None,
        "coordinator_ms_per_step": cpu_s / len(metrics) * 1e3 if cpu_s is not None else None,
        "coordinator_share": (cpu_s / len(metrics)) / step_s if cpu_s is not None else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--global-batch-tokens", type=int, default=2048)
    ap.add_argument("--data", default=os.path.join(ROOT, "prepared"))
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    data = os.path.abspath(args.data)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run([BINARY, "prepare", "--progress", "quiet", "--out", data], check=True)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            rows.append(run_job(tmp, data, args.preset, args.steps, workers,
                                args.global_batch_tokens // workers, max(1, cores // workers)))
    print(f"\n{args.preset}, global batch {args.global_batch_tokens} tokens, {args.steps} steps, {cores} cores "
          f"(medians over steps after the first few)\n")
    print("| workers | tokens/s | step (ms) | all-reduce (ms) | not hidden (ms) | hidden | coordinator CPU/step (ms) | share of step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hidden = "—" if r["hidden"] is None else f"{r['hidden'] * 100:.0f}%"
        print(f"| {r['workers']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['allreduce_ms']:.1f} | "
              f"{r['exposed_ms']:.1f} | {hidden} | {r['coordinator_ms_per_step']:.3f} | {r['coordinator_share'] * 100:.2f}% |")


if __name__ == "__main__":
    main()
