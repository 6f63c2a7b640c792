#!/usr/bin/env python3
"""Writes the ESM-2 parity golden file that tests/layers/test_hf_parity.cpp compares helix against.

A small EsmForMaskedLM (Hugging Face transformers) with random weights runs in float64 on the CPU on
a packed batch of real proteins; the file holds the weights (Hugging Face names), the batch (token ids,
labels, cu_seqlens), the logits of every real token, the loss, every parameter gradient, and the
losses of 3 AdamW steps. Run where torch and transformers are installed (the GPU machine):

    python3 examples/parity/make_golden.py --fasta examples/data/swissprot_3k.fasta.gz \
        --out tests/data/esm2_golden.safetensors

Masking: 15% of residues are selected with a seeded numpy generator, 80% -> <mask>, 10% -> random
amino acid, 10% kept; labels are the original ids there and -100 elsewhere (helix's own masking is
tested separately; here the exact batch is stored, so both sides see identical inputs).
AdamW: lr 1e-3, betas (0.9, 0.98), eps 1e-8, weight decay 0.01 on parameters with 2+ dimensions only.
"""
import argparse
import gzip
import json

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P",
         "K", "Q", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>",
         "<mask>"]
STANDARD_AA = "LAGVSERTIDPKQNFYMHWC"


def read_fasta(path, n, max_len):
    opener = gzip.open if path.endswith(".gz") else open
    seqs, cur = [], []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if cur:
                    seqs.append("".join(cur))
                cur = []
            elif line:
                cur.append(line)
    if cur:
        seqs.append("".join(cur))
    picked = [s for s in seqs if len(s) <= max_len][:n]
    assert len(picked) == n, f"only {len(picked)} sequences of length <= {max_len} in {path}"
    return picked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fasta", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--num-seqs", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=120)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = EsmConfig(vocab_size=33, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=512, max_position_embeddings=1026,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                    mask_token_id=32, pad_token_id=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, hidden_act="gelu", tie_word_embeddings=True)
    model = EsmForMaskedLM(cfg).double()
    # Random but not degenerate weights: default init, then perturb LayerNorm gains/biases and biases.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.train()

    # Tokenize with transformers' own tokenizer (the ids helix must reproduce).
    import os, tempfile
    vocab_path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
    with open(vocab_path, "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    tok = EsmTokenizer(vocab_path)
    seqs = read_fasta(args.fasta, args.num_seqs, args.max_len)
    ids_list = [tok(s)["input_ids"] for s in seqs]

    # MLM masking (numpy, stored in the file).
    input_ids, labels = [], []
    for ids in ids_list:
        ids = np.array(ids, dtype=np.int64)
        lab = np.full_like(ids, -100)
        for i in range(1, len(ids) - 1):
            if rng.random() < 0.15:
                lab[i] = ids[i]
                r = rng.random()
                if r < 0.8:
                    ids[i] = 32
                elif r < 0.9:
                    ids[i] = VOCAB.index(STANDARD_AA[rng.integers(20)])
        input_ids.append(ids)
        labels.append(lab)
    lens = [len(x) for x in input_ids]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    maxlen = max(lens)
    batch = torch.full((len(lens), maxlen), 1, dtype=torch.long)
    lab_b = torch.full((len(lens), maxlen), -100, dtype=torch.long)
    mask = torch.zeros((len(lens), maxlen), dtype=torch.long)
    for b, (x, l) in enumerate(zip(input_ids, labels)):
        batch[b, : len(x)] = torch.from_numpy(x)
        lab_b[b, : len(x)] = torch.from_numpy(l)
        mask[b, : len(x)] = 1

    def packed(t):  # [B, S, ...] -> [T, ...] over real tokens
        return torch.cat([t[b, : lens[b]] for b in range(len(lens))], 0)

    def loss_fn():
        out = model(input_ids=batch, attention_mask=mask)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 33), lab_b.reshape(-1), ignore_index=-100)
        return logits, loss

    weights = {n: p.detach().float().clone() for n, p in model.state_dict().items()
               if "inv_freq" not in n and "position_ids" not in n}
    logits, loss = loss_fn()
    model.zero_grad()
    loss.backward()
    grads = {"grad." + n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-8, foreach=False)
    losses = [loss.item()]
    opt.step()
    for _ in range(args.steps - 1):
        opt.zero_grad()
        _, l = loss_fn()
        losses.append(l.item())
        l.backward()
        opt.step()
    _, l = loss_fn()
    losses.append(l.item())  # loss after the last step

    tensors = dict(weights)
    tensors.update(grads)
    tensors["batch.input_ids"] = torch.from_numpy(np.concatenate(input_ids).astype(np.int32))
    tensors["batch.labels"] = torch.from_numpy(np.concatenate(labels).astype(np.int32))
    tensors["batch.cu_seqlens"] = torch.from_numpy(cu)
    tensors["out.logits"] = packed(logits.detach()).float()
    tensors["out.loss"] = torch.tensor([loss.item()], dtype=torch.float32)
    tensors["out.step_losses"] = torch.tensor(losses, dtype=torch.float32)
    meta = {"config": json.dumps(cfg.to_dict()), "sequences": json.dumps(seqs),
            "adamw": json.dumps({"lr": 1e-3, "beta1": 0.9, "beta2": 0.98, "eps": 1e-8, "weight_decay": 0.01,
                                 "decay": "ndim>=2"}),
            "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(tensors)} tensors, T={int(cu[-1])}, loss={loss.item():.6f}, losses={losses}")


if __name__ == "__main__":
    main()
