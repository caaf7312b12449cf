#!/usr/bin/env python3
"""The ops of kernels/examples/kernel_bench.rs in PyTorch, fp16: what a PyTorch user gets.

Shapes: one seed-256 training step at batch 18 x (1024 + 1024) tokens: N = 18*1024 token
rows, D = 256, F = 1024, H = 4, Dh = 64, V = 16000, attention over B = 18, T = 1024, and
the model's 15,156,224 parameters. `--tiny` divides N by 64, V by 16, T by 16 and the
parameters by 64 (the same tiny shapes as `kernel_bench --device emu`), for a smoke test
with `--device cpu`.

Each op: `--warmup` calls (3), then `--reps` calls (20), each between two CUDA events (on
the CPU: time.perf_counter); the time reported is the median. Backward ops are timed alone
by calling torch.autograd.grad(..., retain_graph=True) on a graph built once; `*_fwd` ops
run with inputs that require grad (the training forward). GB/s uses the same minimum-traffic
formulas as kernel_bench.rs (each input read once, each output written once), so the two
tables compare time for the same work.

  /tmp/tv/bin/python bench/kernel_bench.py [--device cuda|cpu] [--tiny] [--reps N]
                                           [--warmup N] [--json PATH]
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SEED_256_PARAMS = 15_156_224
SMOOTHING = 0.1
DROPOUT = 0.1
LN_EPS = 1e-5
H_BYTES = 2  # fp16
S_BYTES = 4  # fp32 / int32


def shapes(tiny):
    s = dict(n=18 * 1024, d=256, f=1024, h=4, dh=64, v=16_000, b=18, t=1024,
             params=SEED_256_PARAMS)
    if tiny:
        s.update(n=s["n"] // 64, v=s["v"] // 16, t=s["t"] // 16, params=s["params"] // 64)
    return s


class Bench:
    def __init__(self, device, reps, warmup, seed=20261126):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reps, self.warmup = reps, warmup
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.rows = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def uniform(self, shape, lo, hi, dtype=torch.float16, requires_grad=False):
        x = torch.rand(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        x = (lo + (hi - lo) * x).to(dtype)
        return x.requires_grad_(requires_grad)

    def ints(self, n, lo, hi):
        return torch.randint(lo, hi, (n,), generator=self.gen, device=self.device)

    def time(self, fn):
        """Median seconds of one call of fn over self.reps calls, after warm-up."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.reps)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            self.sync()
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def add(self, op, shape, fn, nbytes, flops=None):
        seconds = self.time(fn)
        row = dict(op=op, shape=shape, time_us=seconds * 1e6, bytes=float(nbytes),
                   gbps=nbytes / seconds / 1e9,
                   tflops=None if flops is None else flops / seconds / 1e12)
        print(f"{op:<22} {shape:<28} {row['time_us']:>10.1f} µs", file=sys.stderr)
        self.rows.append(row)


def run(bench, s):
    n, d, f, v, t_len, b = s["n"], s["d"], s["f"], s["v"], s["t"], s["b"]
    h, dh, p = s["h"], s["dh"], s["params"]
    H, S = H_BYTES, S_BYTES
    nd = f"{n}x{d}"
    grad = torch.autograd.grad

    # LayerNorm over N x D. Same traffic formulas as kernel_bench.rs.
    x = bench.uniform((n, d), -2, 2, requires_grad=True)
    w = bench.uniform((d,), 0.5, 1.5, requires_grad=True)
    bias = bench.uniform((d,), -0.5, 0.5, requires_grad=True)
    bench.add("layernorm_fwd", nd, lambda: F.layer_norm(x, (d,), w, bias, LN_EPS),
              H * (2 * n * d + 2 * d) + S * 2 * n)
    y = F.layer_norm(x, (d,), w, bias, LN_EPS)
    dy = bench.uniform((n, d), -1, 1)
    bench.add("layernorm_bwd", nd, lambda: grad(y, (x, w, bias), dy, retain_graph=True),
              H * (4 * n * d + d) + S * (2 * n + 4 * d))
    del x, w, bias, y, dy

    # GELU (tanh approximation) over N x F.
    x = bench.uniform((n, f), -4, 4, requires_grad=True)
    bench.add("gelu_fwd", f"{n}x{f}", lambda: F.gelu(x, approximate="tanh"), H * 2 * n * f)
    y = F.gelu(x, approximate="tanh")
    dy = bench.uniform((n, f), -1, 1)
    bench.add("gelu_bwd", f"{n}x{f}", lambda: grad(y, x, dy, retain_graph=True), H * 3 * n * f)
    del x, y, dy

    # Dropout (out of place, as in a model) and the residual add (in place, as chingu's).
    x = bench.uniform((n, d), -1, 1)
    bench.add("dropout", nd, lambda: F.dropout(x, p=DROPOUT, training=True), H * 2 * n * d)
    acc = bench.uniform((n, d), -1, 1)
    bench.add("add_assign", nd, lambda: acc.add_(x), H * 3 * n * d)
    bench.add(
        "add_dropped", nd, lambda: acc.add_(F.dropout(x, p=DROPOUT, training=True)), H * 3 * n * d
    )
    del x, acc

    # Embedding: table[ids] * sqrt(D) + positions[pos]; backward into the table.
    table = bench.uniform((v, d), -1, 1, requires_grad=True)
    positions = bench.uniform((t_len, d), -1, 1)
    ids = bench.ints(n, 0, v)
    pos = torch.arange(n, device=bench.device) % t_len
    rows_used = torch.unique(ids).numel()
    pos_used = min(t_len, n)
    scale = math.sqrt(d)

    def embed():
        return F.embedding(ids, table) * scale + F.embedding(pos, positions)

    shape = f"{n} rows of {v}x{d}"
    bench.add("embedding_fwd", shape, embed, H * d * (rows_used + pos_used + n) + S * 2 * n)
    emb = embed()
    d_out = bench.uniform((n, d), -1, 1)
    bench.add("embedding_bwd", shape, lambda: grad(emb, table, d_out, retain_graph=True),
              H * n * d + S * (2 * rows_used * d + n))
    del table, positions, emb, d_out

    # Cross-entropy with label smoothing on fp16 logits, forward and backward.
    logits = bench.uniform((n, v), -8, 8, requires_grad=True)
    targets = bench.ints(n, 1, v)

    def cross_entropy():
        loss = F.cross_entropy(logits, targets, ignore_index=0, label_smoothing=SMOOTHING)
        return grad(loss, logits)

    bench.add("cross_entropy", f"{n}x{v}", cross_entropy, H * 2 * n * v + S * 2 * n)
    del logits, targets

    # AdamW (fused) on fp32 parameters, and the gradient norm.
    param = torch.nn.Parameter(bench.uniform((p,), -0.1, 0.1, dtype=torch.float32))
    param.grad = bench.uniform((p,), -0.01, 0.01, dtype=torch.float32)
    opt_args = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    try:
        opt = torch.optim.AdamW([param], fused=True, **opt_args)
        opt.step()
    except RuntimeError as e:  # fused AdamW not built for this device
        print(f"fused AdamW unavailable ({e}); using foreach", file=sys.stderr)
        opt = torch.optim.AdamW([param], foreach=True, **opt_args)
    # chingu's formula includes writing an fp16 copy (P fp16) that PyTorch does not make.
    bench.add("adamw", f"{p} params", opt.step, S * 7 * p + H * p)
    g = param.grad
    bench.add("sum_squares", f"{p} f32", lambda: torch.linalg.vector_norm(g), S * p)
    del param, opt, g

    # Self-attention through scaled_dot_product_attention, chingu's [B, T, H*Dh] layout:
    # seed-256's heads, causal and not, then seed-768's (4 heads of 192, named as
    # kernel_bench.rs names its own rows at that width: what FlashAttention does there).
    attention(bench, b, t_len, h, dh, (False, True), "")
    attention(bench, b, t_len, 4, 192, (False,), "_dh192")


def attention(bench, b, t_len, h, dh, causal_modes, name_suffix):
    """SDPA forward, backward and both at one head shape, each causal mode."""
    grad = torch.autograd.grad
    width = h * dh
    q = bench.uniform((b, t_len, width), -2, 2, requires_grad=True)
    k = bench.uniform((b, t_len, width), -2, 2, requires_grad=True)
    vv = bench.uniform((b, t_len, width), -1, 1, requires_grad=True)
    d_out = bench.uniform((b, t_len, width), -1, 1)
    x_len, lse_len = b * t_len * width, b * h * t_len

    def heads(x):
        return x.view(b, t_len, h, dh).transpose(1, 2)

    for causal in causal_modes:
        def attend():
            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(vv), is_causal=causal)
            return o.transpose(1, 2).reshape(b, t_len, width)

        def fwd_bwd():
            return grad(attend(), (q, k, vv), d_out)

        label = f"B{b} H{h} T{t_len} Dh{dh}" + (" causal" if causal else "")
        suffix = ("_causal" if causal else "") + name_suffix
        fwd_flops = 4 * b * h * t_len * t_len * dh / (2 if causal else 1)
        fwd_bytes = H_BYTES * 4 * x_len + S_BYTES * lse_len
        bwd_bytes = H_BYTES * 8 * x_len + S_BYTES * lse_len
        bench.add("attn_fwd" + suffix, label, attend, fwd_bytes, fwd_flops)
        out = attend()
        bench.add("attn_bwd" + suffix, label,
                  lambda: grad(out, (q, k, vv), d_out, retain_graph=True),
                  bwd_bytes, 2.5 * fwd_flops)
        bench.add("attn_fwd_bwd" + suffix, label, fwd_bwd, fwd_bytes + bwd_bytes,
                  3.5 * fwd_flops)
        del out


def table(rows):
    lines = ["| op | shape | time (µs) | GB/s | TFLOP/s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        tflops = "" if r["tflops"] is None else f"{r['tflops']:.2f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['time_us']:.1f} | {r['gbps']:.1f} | "
                     f"{tflops} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="the emulator's tiny shapes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kernel_bench.py: no CUDA device visible to torch (use --device cpu --tiny)")
    s = shapes(args.tiny)
    bench = Bench(args.device, args.reps, args.warmup)
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"
    print(f"kernel_bench.py on {name}, torch {torch.__version__}, {args.reps} reps, {s}",
          file=sys.stderr)
    run(bench, s)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(impl="pytorch", torch=torch.__version__, device=name,
                           reps=args.reps, timing="median of reps (CUDA events)" if bench.cuda
                           else "median of reps (perf_counter)", shapes=s,
                           results=bench.rows), fh, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    print(f"\nPyTorch {torch.__version__} fp16 on {name} (median of {args.reps} reps after "
          f"{args.warmup} warm-up calls)\n")
    print(table(bench.rows))


if __name__ == "__main__":
    main()
