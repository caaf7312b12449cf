#!/usr/bin/env python3
"""Benchmark `chingu prepare`: a synthetic AIHub-shaped tree of 1,000,000+ pairs and the real
ChatbotData.csv, reporting pairs/s per phase and peak RSS, beside the memory the original
implementation needed to preprocess (27 GB of RAM, its authors' figure).

usage: bench/prepare_bench.py [--pairs 1000000] [--keep]
Run from the repository root; builds the release binary first. Work files go to bench/tmp/.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = os.path.join(ROOT, "bench", "tmp")
BINARY = os.path.join(ROOT, "target", "release", "chingu")
ORIGINAL_PEAK_GB = 27.0


def run_prepare(name, inputs, out):
    """Runs chingu prepare under GNU time; returns a dict of measurements."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", BINARY, "prepare", *inputs, "--out", out, "--progress", "log"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"{name}: chingu prepare failed:\n{proc.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    summary = proc.stdout

    def number(label):
        m = re.search(rf"{label}\s+([\d,]+)", summary)
        return int(m.group(1).replace(",", ""))

    times = re.search(r"read ([\d.]+)s .*tokenizer ([\d.]+)s, encode\+write ([\d.]+)s", summary)
    read_s, tok_s, enc_s = (float(x) for x in times.groups())
    pairs, kept = number("pairs read"), number("kept")
    return {
        "name": name,
        "pairs": pairs,
        "kept": kept,
        "read_rate": pairs / read_s,
        "tok_s": tok_s,
        "enc_rate": kept / enc_s,
        "wall": wall,
        "rss_mb": rss_kb / 1024,
        "summary": summary,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the generated tree and outputs")
    args = ap.parse_args()
    os.chdir(ROOT)
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True)
    os.makedirs(TMP, exist_ok=True)
    tree = os.path.join(TMP, f"aihub-{args.pairs}")
    if not os.path.isdir(tree):
        print(f"generating {tree} ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gen_aihub.py"), tree, "--pairs", str(args.pairs)], check=True)
    results = [
        run_prepare("ChatbotData.csv", [os.path.join(ROOT, "..", "shared", "data", "ChatbotData.csv")], os.path.join(TMP, "out-chatbot")),
        run_prepare(f"synthetic AIHub {args.pairs:,}", [tree], os.path.join(TMP, "out-aihub")),
    ]
    header = "| corpus | pairs read | kept | read (pairs/s) | tokenizer (s) | encode+write (pairs/s) | wall (s) | peak RSS |"
    print()
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| chingu prepare, {r['name']} | {r['pairs']:,} | {r['kept']:,} | {r['read_rate']:,.0f} | {r['tok_s']:.1f} "
            f"| {r['enc_rate']:,.0f} | {r['wall']:.1f} | {r['rss_mb']:,.0f} MB |"
        )
    print(f"| original implementation (its authors' figure) | | | | | | | {ORIGINAL_PEAK_GB:.0f} GB |")
    print()
    print(results[-1]["summary"])
    if not args.keep:
        for r in ("out-chatbot", "out-aihub"):
            shutil.rmtree(os.path.join(TMP, r), ignore_errors=True)


if __name__ == "__main__":
    main()
