#!/usr/bin/env python3
"""Static instruction counts of the attention kernels' tile loops, from their SASS.

Why: without a GPU, the machine code is the one thing about a kernel's speed that can be
measured. A register-resident attention kernel spends each walked tile on its tensor-core
products (HMMA), its shared-memory fragment loads (LDSM) and everything else (addresses, masks,
the softmax, branches). A warp issues one instruction a cycle, and an m16n8k16 HMMA keeps a
sub-partition's tensor core busy for a few cycles, so a loop with many more instructions than
HMMAs is bound by issue, not by the tensor cores.

For each kernel matched by --filter, the script disassembles the cubin (nvdisasm), takes the
longest backward branch (the walked-tile loop: the largest span jumped back over) and counts the
instructions between its target and the branch: all of them, HMMA, LDSM, MUFU.EX2, BAR, BRA.
Both sides of a branch inside the loop are counted (a static count, not a dynamic one), so the
numbers compare two builds of the same kernel, not two kernels.

Input: cubins from `cargo run -q -p chingu-kernels --example dump_cubins -- sm_90 DIR` (NVRTC;
see the example). nvdisasm comes from PyPI (`pip install nvidia-cuda-nvdisasm`); pass its path
with --nvdisasm or put it on PATH.

    python3 bench/sass_loops.py DIR/attention.cu.sm_90.cubin --filter _mma_

With --budget FILE (lines "kernel max-instructions-per-HMMA"; `#` starts a comment), the
script exits 1 when a kernel's loop exceeds its budget or a budgeted kernel is missing: CI
runs it with bench/sass_budget.txt, so a change that brings back, say, a runtime loop bound
or a slow exponential fails there, without a GPU.
"""

import argparse
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNCTION = re.compile(r"^\.text\.([A-Za-z0-9_]+):")
BRANCH_TARGET = re.compile(r"\bBRA\b[^;]*?(?:0x([0-9a-f]+)|`\(\.L_x_(\d+)\))")
LABEL = re.compile(r"^\.L_x_(\d+):")


def disassemble(nvdisasm, cubin):
    """{kernel: [(address, text)]} and {label number: address} per kernel."""
    out = subprocess.run(
        [nvdisasm, "-c", cubin], check=True, capture_output=True, text=True
    ).stdout
    kernels, labels = {}, {}
    current = None
    pending_labels = []
    for line in out.splitlines():
        f = FUNCTION.match(line.strip())
        if f:
            current = f.group(1)
            kernels[current] = []
            labels[current] = {}
            continue
        if current is None:
            continue
        lab = LABEL.match(line.strip())
        if lab:
            pending_labels.append(int(lab.group(1)))
            continue
        m = INSTRUCTION.match(line)
        if m:
            address = int(m.group(1), 16)
            for number in pending_labels:
                labels[current][number] = address
            pending_labels = []
            kernels[current].append((address, m.group(2)))
    return kernels, labels


def opcode(text):
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def main_loop(instructions, labels):
    """(start, end) addresses of the longest backward branch's span, or None."""
    best = None
    for address, text in instructions:
        if opcode(text) != "BRA":
            continue
        m = BRANCH_TARGET.search(text)
        if not m:
            continue
        target = int(m.group(1), 16) if m.group(1) else labels.get(int(m.group(2)))
        if target is None or target >= address:
            continue
        if best is None or address - target > best[1] - best[0]:
            best = (target, address)
    return best


def counts(instructions, span):
    start, end = span
    body = [opcode(t) for a, t in instructions if start <= a <= end]
    return {
        "loop": len(body),
        "HMMA": sum(o.startswith("HMMA") for o in body),
        "LDSM": sum(o.startswith("LDSM") for o in body),
        "EX2": sum(o == "MUFU.EX2" for o in body),
        "BAR": sum(o.startswith("BAR") for o in body),
        "BRA": sum(o == "BRA" for o in body),
        "total": len(instructions),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cubin")
    ap.add_argument("--filter", default="", help="substring a kernel's name must contain")
    ap.add_argument("--nvdisasm", default="nvdisasm")
    ap.add_argument("--budget", help="file of 'kernel max-instructions-per-HMMA' lines")
    args = ap.parse_args()
    kernels, labels = disassemble(args.nvdisasm, args.cubin)
    per_hmma = {}
    print("| kernel | loop instructions | HMMA | LDSM | MUFU.EX2 | BAR | BRA | per HMMA | kernel instructions |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in sorted(kernels):
        if args.filter not in name:
            continue
        span = main_loop(kernels[name], labels[name])
        if span is None:
            print(f"| {name} | no loop | | | | | | | {len(kernels[name])} |")
            continue
        c = counts(kernels[name], span)
        if c["HMMA"]:
            per_hmma[name] = c["loop"] / c["HMMA"]
        per = f"{c['loop'] / c['HMMA']:.1f}" if c["HMMA"] else "—"
        print(
            f"| {name} | {c['loop']} | {c['HMMA']} | {c['LDSM']} | {c['EX2']} | {c['BAR']} "
            f"| {c['BRA']} | {per} | {c['total']} |"
        )
    return check_budget(args.budget, per_hmma) if args.budget else 0


def check_budget(path, per_hmma):
    """0 when every budgeted kernel is present and within its budget, else 1 (and why)."""
    failures = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2:
                failures.append(f"{path}:{number}: expected 'kernel budget', got {line.strip()!r}")
                continue
            name, budget = words[0], float(words[1])
            if name not in per_hmma:
                failures.append(f"{path}:{number}: {name}: no such kernel with a tile loop")
            elif per_hmma[name] > budget:
                failures.append(
                    f"{path}:{number}: {name}: {per_hmma[name]:.2f} instructions per HMMA in its "
                    f"tile loop, over the budget of {budget}"
                )
    for failure in failures:
        print(failure, file=sys.stderr)
    if not failures:
        print(f"every kernel in {path} within its budget")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
