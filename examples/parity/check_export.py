#!/usr/bin/env python3
"""Checks that a helix export opens in Hugging Face transformers and computes the same logits.

Inputs: a directory written by `helix convert --from RUN --to hf:DIR` (model.safetensors +
config.json in the EsmForMaskedLM layout) and a logits file written by
`helix eval --load RUN --dump-logits FILE` (batch 0 of the evaluation: the masked input tokens [T],
cu_seqlens [b+1], labels [T] and helix's logits [T, vocab] in f32). Every sequence of the batch runs
through EsmForMaskedLM (float32, one sequence at a time, no padding) and its logits are compared with
helix's rows; the masked-LM loss of the batch is compared too.

Tolerance: helix evaluates in bf16 on a GPU by default, so the default bound is the bf16 one,
|helix - hf| <= atol + rtol * |hf| with atol 0.05 and rtol 0.02 (pass --atol/--rtol 1e-4 for a
`--dtype f32` dump). Exit status 0 when every logit is within the bound.

On the GPU machine (torch and transformers installed, no internet needed):

    build/helix train --data examples/data/swissprot_3k.fasta.gz --layers 4 --hidden 128 --heads 4 \
        --ffn 512 --max-residues 254 --tokens-per-step 8192 --steps 20 --save /tmp/hx_ck --out /tmp/hx_run
    build/helix convert --from /tmp/hx_ck --to hf:/tmp/hx_hf
    build/helix eval --load /tmp/hx_ck --data examples/data/swissprot_3k.fasta.gz --max-residues 254 \
        --tokens-per-batch 2048 --batches 2 --dump-logits /tmp/hx_logits.safetensors
    python3 examples/parity/check_export.py --model /tmp/hx_hf --logits /tmp/hx_logits.safetensors
"""
import argparse
import json
import math
import struct
import sys
from array import array

DTYPES = {"F32": "f", "I32": "i", "I64": "q"}


def read_safetensors(path):
    """Pure-Python reader (no numpy / safetensors needed): {name: (shape, flat list)}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a = array(DTYPES[e["dtype"]])
        lo, hi = e["data_offsets"]
        a.frombytes(data[lo:hi])
        if sys.byteorder != "little":
            a.byteswap()
        out[name] = (e["shape"], a)
    return out, header.get("__metadata__", {})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with model.safetensors and config.json")
    ap.add_argument("--logits", required=True, help="file from helix eval --dump-logits")
    ap.add_argument("--atol", type=float, default=0.05)
    ap.add_argument("--rtol", type=float, default=0.02)
    args = ap.parse_args()

    tensors, meta = read_safetensors(args.logits)
    tokens = list(tensors["tokens"][1])
    labels = list(tensors["labels"][1])
    cu = list(tensors["cu_seqlens"][1])
    (t_len, vocab), logits = tensors["logits"]
    assert t_len == len(tokens), f"logits have {t_len} rows, tokens {len(tokens)}"
    print(f"helix logits: {len(cu) - 1} sequences, {t_len} tokens, vocab {vocab}, computed in {meta.get('dtype', '?')}")

    import torch
    from transformers import EsmForMaskedLM

    model = EsmForMaskedLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    assert model.config.vocab_size == vocab, f"vocab {model.config.vocab_size} vs {vocab}"
    helix = torch.tensor(logits, dtype=torch.float32).view(t_len, vocab)
    worst, worst_at, bad = 0.0, None, 0
    hf_rows = []
    with torch.no_grad():
        for i in range(len(cu) - 1):
            ids = torch.tensor(tokens[cu[i]:cu[i + 1]], dtype=torch.long).unsqueeze(0)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            hf_rows.append(out)
            ref = helix[cu[i]:cu[i + 1]]
            diff = (ref - out).abs()
            bound = args.atol + args.rtol * out.abs()
            bad += int((diff > bound).sum())
            m = float((diff - bound).max())
            if worst_at is None or m > worst:
                worst, worst_at = m, i
            print(f"  sequence {i}: {cu[i + 1] - cu[i]} tokens, max |diff| {float(diff.max()):.3e}, "
                  f"max |logit| {float(out.abs().max()):.2f}")
    hf = torch.cat(hf_rows)
    lab = torch.tensor(labels, dtype=torch.long)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    hf_loss, hx_loss = float(loss_fn(hf, lab)), float(loss_fn(helix, lab))
    agree = float((hf.argmax(-1) == helix.argmax(-1)).float().mean())
    print(f"masked-LM loss: helix {hx_loss:.5f}  transformers {hf_loss:.5f}  (|diff| {abs(hx_loss - hf_loss):.2e}); "
          f"argmax agreement {agree:.4f}")
    if bad:
        print(f"FAIL: {bad} logits outside atol {args.atol} + rtol {args.rtol} * |hf| (worst in sequence {worst_at})")
        return 1
    if not math.isfinite(hf_loss) or abs(hx_loss - hf_loss) > args.atol:
        print(f"FAIL: losses differ by more than {args.atol}")
        return 1
    print("OK: the export opens in transformers and its logits match helix's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
