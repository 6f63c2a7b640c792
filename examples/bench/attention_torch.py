#!/usr/bin/env python3
"""PyTorch side of the attention benchmark: varlen attention on the lengths helix_bench_attention wrote.

Runs torch.nn.attention.varlen.varlen_attn (PyTorch 2.11, FlashAttention-2 underneath) on the same
packed batches as tests/bench/attention.cpp (same lengths, heads, head dims, bf16, scale 1/sqrt(D))
and prints one JSON line per case with the same fields. If that import fails it falls back to
torch.ops.aten._flash_attention_forward (the op varlen_attn calls), and says so in "backend".

    python3 examples/bench/attention_torch.py --lengths lengths.json [--iters 10] [--warmup 3]
        [--causal] [--cases protein,long4k,long16k] [--dims 64,128]
"""
import argparse
import json
import math
import statistics
import sys

import torch


def make_attention():
    """Returns (backend name, fn(q, k, v, cu, max_len, scale, causal) -> out)."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        def run(q, k, v, cu, max_len, scale, causal):
            window = (-1, 0) if causal else (-1, -1)
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=window)

        return "torch.nn.attention.varlen.varlen_attn", run
    except ImportError as e:
        print(f"attention_torch.py: varlen_attn unavailable ({e}); using aten._flash_attention_forward",
              file=sys.stderr)

        def run(q, k, v, cu, max_len, scale, causal):
            out = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max_len, max_len, 0.0, causal, False, scale=scale)
            return out[0]

        return "torch.ops.aten._flash_attention_forward", run


def time_ms(fn, warmup, iters):
    """Median milliseconds over `iters` runs, each between CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_flops(lengths, heads, dim, causal):
    flops = 4.0 * heads * dim * sum(float(s) * s for s in lengths)
    return flops / 2 if causal else flops


def run_case(name, lengths, dim, heads, causal, backend, attn, warmup, iters):
    dev = torch.device("cuda")
    tokens = sum(lengths)
    gen = torch.Generator(device=dev).manual_seed(42)

    def make():
        return torch.randn(tokens, heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)

    q, k, v, d_o = make(), make(), make(), make()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32, device=dev), 0)
    max_len = max(lengths)
    scale = 1.0 / math.sqrt(dim)

    def fwd():
        with torch.no_grad():
            attn(q, k, v, cu, max_len, scale, causal)

    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd_bwd():
        out = attn(qg, kg, vg, cu, max_len, scale, causal)
        torch.autograd.grad(out, (qg, kg, vg), d_o)

    fwd_ms = time_ms(fwd, warmup, iters)
    fwdbwd_ms = time_ms(fwd_bwd, warmup, iters)
    flops = fwd_flops(lengths, heads, dim, causal)
    print(json.dumps({
        "impl": "torch", "case": name, "mask": "causal" if causal else "bidirectional",
        "head_dim": dim, "heads": heads, "seqs": len(lengths), "tokens": tokens, "max_seqlen": max_len,
        "backend": backend, "fwd_ms": round(fwd_ms, 4), "fwd_tflops": round(flops / fwd_ms * 1e-9, 2),
        "fwdbwd_ms": round(fwdbwd_ms, 4), "fwdbwd_tflops": round(3.5 * flops / fwdbwd_ms * 1e-9, 2),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", required=True, help="JSON written by helix_bench_attention --lengths-out")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--cases", default="protein,long4k,long16k")
    ap.add_argument("--dims", default="64,128")
    args = ap.parse_args()
    with open(args.lengths) as f:
        spec = json.load(f)
    backend, attn = make_attention()
    for name in args.cases.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            run_case(name, spec["cases"][name], dim, spec["heads"][str(dim)], args.causal, backend, attn,
                     args.warmup, args.iters)


if __name__ == "__main__":
    main()
