#!/usr/bin/env python3
"""Scaling study with `helix plan --search`: the best predicted layout of ESM-2 650M, 3B, 15B and
esm3-98b on 8 to 2048 H100s, written as docs/scaling.md's tables (markdown on stdout), a JSON file of
the best layouts and a plot (MFU and tokens/s per GPU against GPUs).

    python3 examples/scaling/scaling_study.py --helix build-cpu/helix [--out examples/scaling]

Needs matplotlib for the plot (the tables need nothing else). Every number comes from the planner;
run the printed command for any cell to see its full per-rank report.
"""
import argparse
import json
import os
import subprocess
import sys

MODELS = [("esm2-650m", "2M"), ("esm2-3b", "2M"), ("esm2-15b", "2M"), ("esm3-98b", "4M")]
GPUS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def search(helix, model, gpus, tokens, fp8, calibration):
    cmd = [helix, "plan", "--model", model, "--gpus", str(gpus), "--tokens-per-step", tokens, "--fp8", fp8,
           "--search", "--json"]
    if calibration:
        cmd += ["--calibration", calibration]
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
    return (rows[0] if rows else None), " ".join(cmd[1:-1])


def layout(r):
    return "tp{} cp{} pp{} v{} dp{} zero{} mb{} {}".format(r["tp"], r["cp"], r["pp"], r["virtual_stages"], r["dp"],
                                                           r["zero"], r["micro_batches"], r["recompute"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--helix", default="build-cpu/helix")
    ap.add_argument("--out", default="examples/scaling")
    ap.add_argument("--calibration", default="")
    a = ap.parse_args()
    results = []
    for model, tokens in MODELS:
        print(f"\n### {model}, {tokens} tokens per step\n")
        print("| GPUs | best layout (bf16) | GiB/rank | step s | tokens/s | MFU | FP8 delayed: layout | tokens/s | MFU |")
        print("|---:|---|---:|---:|---:|---:|---|---:|---:|")
        for g in GPUS:
            best, cmd = search(a.helix, model, g, tokens, "off", a.calibration)
            best8, _ = search(a.helix, model, g, tokens, "delayed", a.calibration)
            results.append({"model": model, "gpus": g, "tokens": tokens, "bf16": best, "fp8": best8, "command": cmd})
            if best is None:
                print(f"| {g} | no layout fits | | | | | | | |")
                continue
            f8 = ("| {} | {:,.0f} | {:.1f}% |".format(layout(best8), best8["tokens_per_second"], 100 * best8["mfu"])
                  if best8 else "| none | | |")
            print("| {} | {} | {:.1f} | {:.3f} | {:,.0f} | {:.1f}% {}".format(
                g, layout(best), best["memory_gib"], best["step_seconds"], best["tokens_per_second"],
                100 * best["mfu"], f8))
        print(f"\ncommand per cell: `helix plan --model {model} --gpus N --tokens-per-step {tokens} --fp8 off --search`")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scaling_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (model, _) in enumerate(MODELS):
        color = "C{}".format(i)
        for key, style in (("bf16", "-o"), ("fp8", "--x")):
            pts = [(r["gpus"], r[key]) for r in results if r["model"] == model and r[key]]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            label = f"{model} {'bf16' if key == 'bf16' else 'fp8'}"
            ax1.plot(xs, [100 * p[1]["mfu"] for p in pts], style, color=color, label=label)
            ax2.plot(xs, [p[1]["tokens_per_second"] / p[0] for p in pts], style, color=color, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("H100 GPUs")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("predicted MFU (model FLOPs / 989 TFLOP/s bf16 peak)")
    ax2.set_ylabel("predicted tokens/s per GPU")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle("helix plan --search: best predicted layout per GPU count (calibration examples/calibration/h100.json)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "scaling.png"), dpi=110)


if __name__ == "__main__":
    main()
