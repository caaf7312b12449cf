#!/usr/bin/env python3
"""Side by side: chingu's kernels (kernels/examples/kernel_bench.rs --json) against the
same ops in PyTorch (bench/kernel_bench.py --json).

  python3 bench/kernel_compare.py CHINGU.json PYTORCH.json

Prints one markdown table: op, shape, chingu µs, PyTorch µs, ratio = chingu ÷ PyTorch
(below 1: chingu is faster). Ops are matched by name; an op only one side timed shows "—".
Shapes are the same on both sides when both ran the full shapes (or both the tiny ones);
a mismatch is flagged in the shape column.
"""

import json
import sys


def load(path):
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        sys.exit(f"kernel_compare.py: cannot read {path}: {e}")
    if "results" not in data:
        sys.exit(f"kernel_compare.py: {path} has no 'results' (not a kernel_bench JSON file)")
    return data


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])
    by_op = {r["op"]: r for r in theirs["results"]}
    ops = [r["op"] for r in ours["results"]]
    ops += [op for op in by_op if op not in ops]
    mine = {r["op"]: r for r in ours["results"]}

    print(f"chingu: {ours.get('device', '?')}, {ours.get('timing', '')}, "
          f"{ours.get('reps', '?')} reps")
    print(f"PyTorch {theirs.get('torch', '')}: {theirs.get('device', '?')}, "
          f"{theirs.get('timing', '')}, {theirs.get('reps', '?')} reps")
    print()
    print("| op | shape | chingu µs | PyTorch µs | ratio |")
    print("|---|---|---:|---:|---:|")
    for op in ops:
        a, b = mine.get(op), by_op.get(op)
        shape = (a or b)["shape"]
        if a and b and a["shape"] != b["shape"]:
            shape = f"{a['shape']} vs {b['shape']} (differ)"
        ta = f"{a['time_us']:.1f}" if a else "—"
        tb = f"{b['time_us']:.1f}" if b else "—"
        ratio = f"{a['time_us'] / b['time_us']:.2f}" if a and b and b["time_us"] > 0 else "—"
        print(f"| {op} | {shape} | {ta} | {tb} | {ratio} |")


if __name__ == "__main__":
    main()
