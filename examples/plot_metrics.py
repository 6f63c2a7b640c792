#!/usr/bin/env python3
"""Plots loss (train and validation) and throughput from a helix metrics JSONL file.

    python3 examples/plot_metrics.py runs/demo/metrics.jsonl -o runs/demo/metrics.png
Needs matplotlib (pip install matplotlib).
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="+", help="one or more metrics.jsonl files (one curve each)")
    ap.add_argument("-o", "--out", default="metrics.png")
    args = ap.parse_args()
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in args.jsonl:
        train, evals = [], []
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                (train if r["kind"] == "train" else evals).append(r)
        steps = [r["step"] for r in train if r["loss"] is not None]
        ax_loss.plot(steps, [r["loss"] for r in train if r["loss"] is not None], label=f"{path} train", lw=1)
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label=f"{path} valid")
        ax_tps.plot([r["step"] for r in train], [r["tokens_per_second"] for r in train], label=path, lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("masked-LM loss")
    ax_loss.legend()
    ax_tps.set_xlabel("step")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
