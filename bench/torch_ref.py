#!/usr/bin/env python3
"""PyTorch reference for chingu's encoder-decoder transformer.

The model here is written out by hand (no nn.Transformer / nn.MultiheadAttention) so
that every operation matches what the Rust side implements, parameter for parameter.

Subcommands:
  golden  --out PATH            write the golden safetensors file (float64, fixed seed)
  check                         gradcheck on a small instance + mask / loss sanity checks
  bench   [--threads N] [--steps N] [--warmup N] [--preset NAME]
                                time full training steps, print one line of JSON
  params  [--preset NAME]       print the parameter count of a preset

Model summary (see bench/golden/README.md for the exact formulas):
  x = embed[ids] * sqrt(D) + PE[pos]            (sinusoidal PE, same for both stacks)
  pre-norm  enc: h = x + SA(ln1 x); out = h + FFN(ln2 h);           memory = ln_f(out)
            dec: h1 = x + CSA(ln1 x); h2 = h1 + CA(ln2 h1, memory); out = h2 + FFN(ln3 h2);
                 y = ln_f(out)
  post-norm enc: h = ln1(x + SA x); out = ln2(h + FFN h)
            dec: h1 = ln1(x + CSA x); h2 = ln2(h1 + CA(h1, memory)); out = ln3(h2 + FFN h2)
  logits = y @ E^T (tied) or y @ lm_head^T;   loss = cross_entropy(ignore_index=0,
  label_smoothing=ls, reduction=mean)
Dropout (training only, p = cfg.dropout): on the embedding sum, and on each sub-layer
output before it is added to the residual. No dropout on attention probabilities.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_ID = 0
LN_EPS = 1e-5
GOLDEN_SEED = 20261125


def make_config(**kw):
    cfg = dict(
        vocab=37,
        d_model=16,
        heads=2,
        d_ff=32,
        enc_layers=2,
        dec_layers=2,
        max_len=16,
        norm="pre",
        activation="gelu",
        tied=True,
        label_smoothing=0.1,
        dropout=0.0,
        pad_id=PAD_ID,
        ln_eps=LN_EPS,
    )
    for k, v in kw.items():
        if k not in cfg:
            raise KeyError(k)
        cfg[k] = v
    assert cfg["norm"] in ("pre", "post")
    assert cfg["activation"] in ("gelu", "relu")
    assert cfg["d_model"] % cfg["heads"] == 0
    return cfg


PRESETS = {
    "seed-256": make_config(
        vocab=16000,
        d_model=256,
        heads=4,
        d_ff=1024,
        enc_layers=6,
        dec_layers=6,
        max_len=1024,
        norm="pre",
        activation="gelu",
        tied=True,
        label_smoothing=0.1,
        dropout=0.1,
    ),
}
PRESETS["seed-768"] = dict(PRESETS["seed-256"], d_model=768, d_ff=3072)


def sinusoidal_pe(length, d, dtype, device=None):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same)."""
    pos = torch.arange(length, dtype=torch.float64, device=device).unsqueeze(1)  # [L,1]
    two_i = torch.arange(0, d, 2, dtype=torch.float64, device=device)  # [d/2]
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), two_i / d)
    pe = torch.zeros(length, d, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d // 2])
    return pe.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Linear(nn.Module):
    """y = x @ W^T + b, W: [out, in]."""

    def __init__(self, d_in, d_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x):
        y = x @ self.weight.t()
        if self.bias is not None:
            y = y + self.bias
        return y


def length_mask(key_len, n_keys):
    """[B, Tk] bool, True where key j is valid (j < key_len[b])."""
    j = torch.arange(n_keys, device=key_len.device)
    return j.unsqueeze(0) < key_len.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.dh = d // heads
        self.q = Linear(d, d)
        self.k = Linear(d, d)
        self.v = Linear(d, d)
        self.o = Linear(d, d)

    def forward(self, xq, xkv, key_len, causal):
        B, Tq, D = xq.shape
        Tk = xkv.shape[1]
        H, Dh = self.h, self.dh
        # [B, T, D] -> [B, H, T, Dh]; head h = columns h*Dh..(h+1)*Dh
        q = self.q(xq).view(B, Tq, H, Dh).transpose(1, 2)
        k = self.k(xkv).view(B, Tk, H, Dh).transpose(1, 2)
        v = self.v(xkv).view(B, Tk, H, Dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)  # [B, H, Tq, Tk]
        allowed = length_mask(key_len, Tk)[:, None, None, :]  # [B,1,1,Tk]
        if causal:
            i = torch.arange(Tq, device=xq.device)[:, None]
            j = torch.arange(Tk, device=xq.device)[None, :]
            allowed = allowed & (j <= i)[None, None, :, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = (p @ v).transpose(1, 2).reshape(B, Tq, D)
        return self.o(out)


class FFN(nn.Module):
    def __init__(self, d, f, activation):
        super().__init__()
        self.fc1 = Linear(d, f)
        self.fc2 = Linear(f, d)
        self.activation = activation

    def forward(self, x):
        h = self.fc1(x)
        if self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.norm = cfg["norm"]
        self.ln1 = LayerNorm(d, cfg["ln_eps"])
        self.self_attn = Attention(d, cfg["heads"])
        self.ln2 = LayerNorm(d, cfg["ln_eps"])
        self.ffn = FFN(d, cfg["d_ff"], cfg["activation"])
        self.drop = nn.Dropout(cfg["dropout"])

    def forward(self, x, src_len):
        if self.norm == "pre":
            a = self.ln1(x)
            h = x + self.drop(self.self_attn(a, a, src_len, causal=False))
            return h + self.drop(self.ffn(self.ln2(h)))
        h = self.ln1(x + self.drop(self.self_attn(x, x, src_len, causal=False)))
        return self.ln2(h + self.drop(self.ffn(h)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.norm = cfg["norm"]
        self.ln1 = LayerNorm(d, cfg["ln_eps"])
        self.self_attn = Attention(d, cfg["heads"])
        self.ln2 = LayerNorm(d, cfg["ln_eps"])
        self.cross_attn = Attention(d, cfg["heads"])
        self.ln3 = LayerNorm(d, cfg["ln_eps"])
        self.ffn = FFN(d, cfg["d_ff"], cfg["activation"])
        self.drop = nn.Dropout(cfg["dropout"])

    def forward(self, x, tgt_len, memory, src_len):
        if self.norm == "pre":
            a = self.ln1(x)
            h1 = x + self.drop(self.self_attn(a, a, tgt_len, causal=True))
            h2 = h1 + self.drop(self.cross_attn(self.ln2(h1), memory, src_len, causal=False))
            return h2 + self.drop(self.ffn(self.ln3(h2)))
        h1 = self.ln1(x + self.drop(self.self_attn(x, x, tgt_len, causal=True)))
        h2 = self.ln2(h1 + self.drop(self.cross_attn(h1, memory, src_len, causal=False)))
        return self.ln3(h2 + self.drop(self.ffn(h2)))


class Stack(nn.Module):
    def __init__(self, cfg, layer_cls, n):
        super().__init__()
        self.layers = nn.ModuleList([layer_cls(cfg) for _ in range(n)])
        if cfg["norm"] == "pre":
            self.ln_f = LayerNorm(cfg["d_model"], cfg["ln_eps"])
        else:
            self.ln_f = None


class Seq2Seq(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        V, D = cfg["vocab"], cfg["d_model"]
        self.embed = nn.Module()
        self.embed.weight = nn.Parameter(torch.randn(V, D) * (D ** -0.5))
        self.encoder = Stack(cfg, EncoderLayer, cfg["enc_layers"])
        self.decoder = Stack(cfg, DecoderLayer, cfg["dec_layers"])
        if not cfg["tied"]:
            self.lm_head = nn.Module()
            self.lm_head.weight = nn.Parameter(torch.randn(V, D) * (D ** -0.5))
        self.drop = nn.Dropout(cfg["dropout"])

    def embed_ids(self, ids):
        T = ids.shape[1]
        assert T <= self.cfg["max_len"], (T, self.cfg["max_len"])
        w = self.embed.weight
        pe = sinusoidal_pe(T, self.cfg["d_model"], w.dtype, w.device)
        x = w[ids] * math.sqrt(self.cfg["d_model"]) + pe.unsqueeze(0)
        return self.drop(x)

    def encode(self, src, src_len):
        x = self.embed_ids(src)
        for layer in self.encoder.layers:
            x = layer(x, src_len)
        if self.encoder.ln_f is not None:
            x = self.encoder.ln_f(x)
        return x

    def decode(self, tgt_in, tgt_len, memory, src_len):
        y = self.embed_ids(tgt_in)
        for layer in self.decoder.layers:
            y = layer(y, tgt_len, memory, src_len)
        if self.decoder.ln_f is not None:
            y = self.decoder.ln_f(y)
        w_out = self.embed.weight if self.cfg["tied"] else self.lm_head.weight
        return y @ w_out.t()

    def forward(self, src, src_len, tgt_in, tgt_len):
        memory = self.encode(src, src_len)
        return self.decode(tgt_in, tgt_len, memory, src_len), memory

    def loss(self, logits, targets):
        V = self.cfg["vocab"]
        return F.cross_entropy(
            logits.reshape(-1, V),
            targets.reshape(-1),
            ignore_index=self.cfg["pad_id"],
            label_smoothing=self.cfg["label_smoothing"],
            reduction="mean",
        )


def is_layernorm_param(name):
    return any(f".{ln}." in "." + name for ln in ("ln1", "ln2", "ln3", "ln_f"))


@torch.no_grad()
def golden_init(model, gen):
    """Every parameter ~ N(0, 0.3); LayerNorm weight = 1 + N(0, 0.1), bias ~ N(0, 0.1).
    Drawn in named_parameters() order from `gen`."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if is_layernorm_param(name):
            if name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
        else:
            p.copy_(0.3 * noise)


def random_batch(gen, B, S, T, src_len, tgt_len, V):
    """ids in 1..V-1 within the length, pad (0) beyond it."""
    src_len = torch.tensor(src_len, dtype=torch.int64)
    tgt_len = torch.tensor(tgt_len, dtype=torch.int64)

    def ids(n, lens):
        x = torch.randint(1, V, (B, n), generator=gen, dtype=torch.int64)
        valid = torch.arange(n)[None, :] < lens[:, None]
        return torch.where(valid, x, torch.zeros_like(x))

    src = ids(S, src_len)
    tgt_in = ids(T, tgt_len)
    targets = ids(T, tgt_len)
    return src, src_len, tgt_in, tgt_len, targets


def run_variant(cfg, gen, batch):
    model = Seq2Seq(cfg).double()
    golden_init(model, gen)
    model.eval()  # dropout is 0 anyway
    src, src_len, tgt_in, tgt_len, targets = batch
    model.zero_grad(set_to_none=True)
    logits, memory = model(src, src_len, tgt_in, tgt_len)
    loss = model.loss(logits, targets)
    loss.backward()
    return model, logits.detach(), memory.detach(), loss.detach()


GOLDEN_CFGS = {
    "": make_config(),
    "post.": make_config(norm="post", activation="relu", tied=False),
}
GOLDEN_SHAPE = dict(B=3, S=7, T=6, src_len=[7, 4, 1], tgt_len=[6, 3, 5])


def canonicalize_header(path):
    """safetensors writes __metadata__ from a hash map, so its key order (and with it the
    file's bytes) changes from run to run. Rewrite the header with the metadata keys
    sorted, same length (JSON whitespace padding is allowed by the format), so that
    regenerating the golden file is byte-for-byte reproducible."""
    import struct
    from collections import OrderedDict

    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        hdr = json.loads(raw.decode("utf-8"), object_pairs_hook=OrderedDict)
        out = OrderedDict()
        out["__metadata__"] = OrderedDict(sorted(hdr.pop("__metadata__", {}).items()))
        for k in sorted(hdr):
            out[k] = hdr[k]
        new = json.dumps(out, separators=(",", ":")).encode("utf-8")
        if len(new) > n:
            return  # cannot happen for the same content; leave the file as written
        new = new + b" " * (n - len(new))
        f.seek(8)
        f.write(new)


def cmd_golden(args):
    from safetensors.torch import save_file

    torch.manual_seed(GOLDEN_SEED)
    gen = torch.Generator().manual_seed(GOLDEN_SEED)
    g = GOLDEN_SHAPE
    V = GOLDEN_CFGS[""]["vocab"]
    batch = random_batch(gen, g["B"], g["S"], g["T"], g["src_len"], g["tgt_len"], V)
    src, src_len, tgt_in, tgt_len, targets = batch
    tensors = {
        "input.src": src,
        "input.src_len": src_len,
        "input.tgt_in": tgt_in,
        "input.tgt_len": tgt_len,
        "input.targets": targets,
    }
    summary = {}
    for prefix, cfg in GOLDEN_CFGS.items():
        model, logits, memory, loss = run_variant(cfg, gen, batch)
        for name, p in model.named_parameters():
            tensors[f"{prefix}param.{name}"] = p.detach().clone().contiguous()
            tensors[f"{prefix}grad.{name}"] = p.grad.detach().clone().contiguous()
        tensors[f"{prefix}out.logits"] = logits.clone().contiguous()
        tensors[f"{prefix}out.memory"] = memory.clone().contiguous()
        tensors[f"{prefix}out.loss"] = loss.reshape(1).clone()
        summary[prefix or "pre."] = float(loss)
    meta = {
        "format": "chingu-golden",
        "version": "1",
        "torch": torch.__version__,
        "config": json.dumps(
            {
                "pre": GOLDEN_CFGS[""],
                "post": GOLDEN_CFGS["post."],
                "batch": g,
                "seed": GOLDEN_SEED,
                "dtype": "float64",
            },
            sort_keys=True,
        ),
    }
    save_file(tensors, args.out, metadata=meta)
    canonicalize_header(args.out)
    print(json.dumps({"out": args.out, "tensors": len(tensors), "loss": summary}))


def manual_loss(logits, targets, V, eps, pad):
    """The formula the Rust side implements; must equal F.cross_entropy's."""
    logp = torch.log_softmax(logits.reshape(-1, V), dim=-1)
    t = targets.reshape(-1)
    keep = t != pad
    nll = -logp.gather(1, t.clamp(min=0)[:, None])[:, 0]
    smooth = -logp.mean(dim=-1)  # uniform over all V classes, pad class included
    row = (1 - eps) * nll + eps * smooth
    return row[keep].sum() / keep.sum()


def cmd_check(args):
    from torch.func import functional_call

    ok = True
    gen = torch.Generator().manual_seed(7)
    results = {}
    for label, kw in {
        "pre-gelu-tied": dict(norm="pre", activation="gelu", tied=True),
        "post-relu-untied": dict(norm="post", activation="relu", tied=False),
    }.items():
        cfg = make_config(vocab=11, d_model=8, heads=2, d_ff=12, enc_layers=1, dec_layers=2,
                          max_len=8, label_smoothing=0.1, **kw)
        model = Seq2Seq(cfg).double()
        golden_init(model, gen)
        batch = random_batch(gen, 2, 5, 4, [5, 2], [4, 2], cfg["vocab"])
        src, src_len, tgt_in, tgt_len, targets = batch
        names = [n for n, _ in model.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

        def f(*ps):
            logits, _ = functional_call(model, dict(zip(names, ps)), (src, src_len, tgt_in, tgt_len))
            return model.loss(logits, targets)

        n_el = sum(p.numel() for p in params)
        gc = torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5)

        # Manual label-smoothed loss == F.cross_entropy.
        with torch.no_grad():
            logits, _ = model(src, src_len, tgt_in, tgt_len)
            d_loss = (model.loss(logits, targets)
                      - manual_loss(logits, targets, cfg["vocab"], cfg["label_smoothing"], 0)).abs().item()
            # Mask checks: changing padded src ids / padded tgt ids must not change the
            # logits at valid target positions.
            src2 = src.clone()
            src2[1, 2:] = 5
            tgt2 = tgt_in.clone()
            tgt2[1, 2:] = 7
            logits2, _ = model(src2, src_len, tgt2, tgt_len)
            valid = (torch.arange(tgt_in.shape[1])[None, :] < tgt_len[:, None])
            d_mask = (logits - logits2)[valid].abs().max().item()
            # Causality: changing a future target token leaves earlier positions alone.
            tgt3 = tgt_in.clone()
            tgt3[0, 3] = (tgt3[0, 3] % (cfg["vocab"] - 1)) + 1
            logits3, _ = model(src, src_len, tgt3, tgt_len)
            d_causal = (logits[0, :3] - logits3[0, :3]).abs().max().item()
        good = gc and d_loss < 1e-12 and d_mask < 1e-12 and d_causal < 1e-12
        ok &= good
        results[label] = dict(gradcheck=gc, param_elems=n_el, loss_formula_diff=d_loss,
                              pad_invariance_diff=d_mask, causal_diff=d_causal)

    # The hand-written pieces against torch built-ins.
    with torch.no_grad():
        x = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
        ln = LayerNorm(8, LN_EPS).double()
        ln.weight.normal_(1.0, 0.1, generator=gen)
        ln.bias.normal_(0.0, 0.1, generator=gen)
        d_ln = (ln(x) - F.layer_norm(x, (8,), ln.weight, ln.bias, LN_EPS)).abs().max().item()
        att = Attention(8, 2).double()
        for p in att.parameters():
            p.normal_(0.0, 0.3, generator=gen)
        mem = torch.randn(2, 4, 8, dtype=torch.float64, generator=gen)
        klen = torch.tensor([4, 2])
        d_att = 0.0
        for xkv, kl, causal in ((x, torch.tensor([5, 3]), True), (mem, klen, False)):
            ours = att(x, xkv, kl, causal)
            q = att.q(x).view(2, 5, 2, 4).transpose(1, 2)
            k = att.k(xkv).view(2, -1, 2, 4).transpose(1, 2)
            v = att.v(xkv).view(2, -1, 2, 4).transpose(1, 2)
            m = length_mask(kl, xkv.shape[1])[:, None, None, :]
            if causal:
                m = m & torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            ref = att.o(ref.transpose(1, 2).reshape(2, 5, 8))
            d_att = max(d_att, (ours - ref).abs().max().item())
    results["builtin_diff"] = dict(layer_norm=d_ln, attention_vs_sdpa=d_att)
    ok &= d_ln < 1e-12 and d_att < 1e-12

    # Central finite differences on the golden configuration itself (sampled entries).
    torch.manual_seed(GOLDEN_SEED)
    g_gen = torch.Generator().manual_seed(GOLDEN_SEED)
    g = GOLDEN_SHAPE
    batch = random_batch(g_gen, g["B"], g["S"], g["T"], g["src_len"], g["tgt_len"], 37)
    fd = {}
    for prefix, cfg in GOLDEN_CFGS.items():
        model, _, _, _ = run_variant(cfg, g_gen, batch)
        pick = torch.Generator().manual_seed(1)
        worst = 0.0
        with torch.no_grad():
            for name, p in model.named_parameters():
                for _ in range(3):
                    idx = int(torch.randint(p.numel(), (1,), generator=pick))
                    flat = p.view(-1)
                    orig = flat[idx].item()
                    h = 1e-6
                    flat[idx] = orig + h
                    lp = model.loss(model(*batch[:4])[0], batch[4]).item()
                    flat[idx] = orig - h
                    lm = model.loss(model(*batch[:4])[0], batch[4]).item()
                    flat[idx] = orig
                    num = (lp - lm) / (2 * h)
                    ana = p.grad.view(-1)[idx].item()
                    err = abs(num - ana) / max(1.0, abs(ana))
                    worst = max(worst, err)
        fd[prefix or "pre."] = worst
        ok &= worst < 1e-6
    results["golden_finite_diff_worst_rel_err"] = fd
    results["ok"] = ok
    print(json.dumps(results, indent=1))
    return 0 if ok else 1


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def cmd_params(args):
    cfg = PRESETS[args.preset]
    model = Seq2Seq(cfg)
    print(count_params(model))


def model_flops(cfg, B, S, T):
    """Matrix FLOPs of one training step (forward ×3 for forward + backward), counting full
    attention score matrices (causal ones too), as MFU figures usually do."""
    D, F, V = cfg["d_model"], cfg["d_ff"], cfg["vocab"]
    le, ld = cfg["enc_layers"], cfg["dec_layers"]
    enc = le * (2 * S * (4 * D * D + 2 * D * F) + 4 * S * S * D)
    dec = ld * (2 * T * (4 * D * D + 2 * D * F) + 2 * T * 2 * D * D + 2 * S * 2 * D * D
                + 4 * T * T * D + 4 * T * S * D)
    out = 2 * T * D * V
    return 3 * B * (enc + dec + out)


def cmd_bench(args):
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = Seq2Seq(cfg).float().to(dev)
    model.train()
    B, S, T = args.batch, args.src_len, args.tgt_len
    V = cfg["vocab"]
    src = torch.randint(1, V, (B, S), device=dev)
    tgt_in = torch.randint(1, V, (B, T), device=dev)
    targets = torch.randint(1, V, (B, T), device=dev)
    src_len = torch.full((B,), S, dtype=torch.int64, device=dev)
    tgt_len = torch.full((B,), T, dtype=torch.int64, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    # AMP fp16 with dynamic loss scaling: what a PyTorch user would run on a GPU.
    scaler = torch.amp.GradScaler("cuda") if cuda and args.amp else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
            logits, _ = model(src, src_len, tgt_in, tgt_len)
            loss = model.loss(logits, targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step().item()
            times.append(time.perf_counter() - t0)
    times.sort()
    # Median for the GPU (event-timed, many steps); the mean on the CPU as before.
    step_s = times[len(times) // 2] if cuda else sum(times) / len(times)
    tokens = B * (S + T)
    result = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "amp": bool(scaler),
        "preset": args.preset,
        "batch": [B, S, T],
        "threads": args.threads,
        "tokens_per_step": tokens,
        "step_ms": round(step_s * 1000, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "params": count_params(model),
    }
    if cuda:
        flops = model_flops(cfg, B, S, T)
        result["tflops"] = round(flops / step_s / 1e12, 2)
        result["mfu"] = round(flops / step_s / (args.peak_tflops * 1e12), 4)
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("golden", help="write the golden safetensors file")
    p.add_argument("--out", default="bench/golden/tiny-v1.safetensors")
    p.set_defaults(fn=cmd_golden)

    p = sub.add_parser("check", help="gradcheck + mask/loss sanity checks")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("bench", help="time training steps")
    p.add_argument("--preset", default="seed-256", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=18)
    p.add_argument("--src-len", type=int, default=64)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler (cuda only)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense fp16 tensor peak for MFU (H100/H200 SXM: 989)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("params", help="print parameter count")
    p.add_argument("--preset", default="seed-256", choices=sorted(PRESETS))
    p.set_defaults(fn=cmd_params)

    args = ap.parse_args(argv)
    rc = args.fn(args)
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
