#!/usr/bin/env python3
"""PyTorch side of the training benchmark: ESM-2 masked-LM training on the batches helix trains on.

The data pipeline is a port of helix's (launch/data/*): the same FASTA records, the same 1% validation
split by record-id hash, the same Philox-4x32-10 shuffle, crops and 15% (80/10/10) masking, the same
greedy THD packing of whole <cls> crop <eos> samples up to --tokens-per-step. With the same seed and
step count every step therefore sees exactly the proteins, lengths and masks that `helix train` sees
(check it without a GPU: --dump-batches), and tokens, FLOPs and learning rates match step for step.

Modes (one per run, so that peak memory is per mode):
  --mode thd             hand-written ESM-2 on packed THD batches, attention by
                         torch.nn.attention.varlen.varlen_attn (fallback: aten._flash_attention_forward)
  --mode thd --compile   the same, each transformer layer, the embedding and the head under torch.compile
                         (--compile-scope model: the whole model as one torch.compile region)
  --mode hf              transformers' EsmForMaskedLM (attn_implementation="sdpa") on padded batches:
                         the step's proteins sorted by length and cut into padded micro-batches of at
                         most --hf-micro-tokens tokens (gradient accumulation)
All modes: bf16 autocast, fp32 master weights, torch.optim.AdamW(fused=True) with weight decay on
matrices and the embedding, global-norm clipping, helix's learning-rate schedule. The first --warmup
steps are not timed; each timed step runs from the host-to-device copy of its (pinned, prebuilt)
batch to the loss on the host. Prints one JSON line (also appended to --out when given).

    python3 examples/bench/train_torch.py --model esm2-650m --mode thd [--compile] --steps 30 --warmup 5
    python3 examples/bench/train_torch.py --self-test                # numpy only: Philox known answers
    python3 examples/bench/train_torch.py --dump-batches 4 FILE      # numpy only: batches as JSON
"""
import argparse
import gzip
import json
import math
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(ROOT, "examples", "data", "swissprot_3k.fasta.gz")

# ---- Model shapes and FLOPs (layers/model_config.cpp) -----------------------------------------------

PRESETS = {  # name: (layers, hidden, heads, ffn)
    "esm2-8m": (6, 320, 20, 1280), "esm2-35m": (12, 480, 20, 1920),
    "esm2-150m": (30, 640, 20, 2560), "esm2-650m": (33, 1280, 20, 5120),
    "esm2-3b": (36, 2560, 40, 10240), "esm2-15b": (48, 5120, 40, 20480),
}
VOCAB = 33
MAX_POSITIONS = 1026
LAYER_NORM_EPS = 1e-5
CLS_ID, PAD_ID, EOS_ID, MASK_ID = 0, 1, 2, 32
IGNORE = -100


def matmul_params(layers, hidden, ffn, vocab=VOCAB):
    """ModelConfig::num_matmul_params: QKV, out-proj, FC1, FC2 per layer, LM-head dense and decoder."""
    return layers * (4 * hidden * hidden + 2 * hidden * ffn) + hidden * hidden + hidden * vocab


def train_flops(layers, hidden, ffn, seqlens):
    """ModelConfig::train_flops: 6 * matmul params * tokens + 12 * hidden * layers * sum(s^2)."""
    tokens = float(sum(seqlens))
    sq = float(sum(float(s) * s for s in seqlens))
    return 6.0 * matmul_params(layers, hidden, ffn) * tokens + 12.0 * hidden * layers * sq


# ---- Counter-based randomness (core/philox.h, launch/data/sample.h) ---------------------------------

M64 = (1 << 64) - 1
_U32 = np.uint64(0xFFFFFFFF)


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on numpy uint64 arrays holding 32-bit words; keys are Python ints."""
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # exact: both factors < 2^32
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _U32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _U32)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox_block(key, subsequence, offset):
    """Block `offset` of stream (key, subsequence) (core/philox.h philox_block); arrays broadcast."""
    off = np.asarray(offset, dtype=np.uint64)
    sub = np.asarray(subsequence, dtype=np.uint64)
    off, sub = np.broadcast_arrays(off, sub)
    return philox4x32_10(off & _U32, off >> np.uint64(32), sub & _U32, sub >> np.uint64(32),
                         key & 0xFFFFFFFF, key >> 32)


SHUFFLE, CROP, MASK = 1, 2, 3  # RandomStream


def stream_key(seed, epoch, stream):
    s = splitmix64(seed ^ ((stream * 0xD1B54A32D192ED03) & M64))
    return splitmix64(s ^ (epoch & M64))


def self_test():
    """Known answers of Philox4x32-10 (Random123 kat_vectors, as tests/core/test_philox.cpp)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
             ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
             ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
              (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for ctr, key, want in cases:
        got = philox4x32_10(*(np.array([c], dtype=np.uint64) for c in ctr), *key)
        got = tuple(int(g[0]) for g in got)
        assert got == want, f"philox KAT: expected {[hex(w) for w in want]}, got {[hex(g) for g in got]}"
    print("self-test: Philox4x32-10 known answers ok")


# ---- Data (launch/data/{fasta,dataset,sample,packing,loader}.cpp) ------------------------------------

# Token ids 4..30 of the ESM-2 alphabet (transformers' EsmTokenizer vocab order).
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
_RESIDUE_ID = np.full(256, -1, dtype=np.int16)
for _i, _c in enumerate(RESIDUES):
    _RESIDUE_ID[ord(_c)] = 4 + _i
    if _c.isalpha():
        _RESIDUE_ID[ord(_c.lower())] = 4 + _i


def fnv1a64(data: bytes):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & M64
    return h


def read_fasta(path):
    """Records as (id hash, uint8 residue ids); strict like helix without --skip-bad-records."""
    records = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        rid, seq, line_no = None, [], 0

        def finish():
            s = b"".join(seq)
            if s.endswith(b"*"):
                s = s[:-1]
            if not s:
                raise ValueError(f"{path}: record '{rid.decode(errors='replace')}' has no sequence")
            ids = _RESIDUE_ID[np.frombuffer(s, dtype=np.uint8)]
            if (ids < 0).any():
                bad = s[int(np.argmax(ids < 0))]
                raise ValueError(f"{path}: record '{rid.decode(errors='replace')}': byte 0x{bad:02X} is "
                                 "outside the ESM alphabet")
            records.append((fnv1a64(rid), ids.astype(np.uint8)))

        for raw in f:
            line_no += 1
            line = raw.rstrip(b"\r\n")
            if line.startswith(b">"):
                if rid is not None:
                    finish()
                rid, seq = line[1:].replace(b"\t", b" ").split(b" ")[0], []
                if not rid:
                    raise ValueError(f"{path}:{line_no}: header line with no id after '>'")
            elif line.strip():
                if rid is None:
                    raise ValueError(f"{path}:{line_no}: sequence data before the first '>' header")
                seq.append(line.replace(b" ", b"").replace(b"\t", b""))
        if rid is not None:
            finish()
    if not records:
        raise ValueError(f"{path}: no FASTA records")
    return records


def train_indices(records, valid_fraction, split_seed=0):
    """split_indices(Split::kTrain): records whose id hash does not fall into validation."""
    if valid_fraction <= 0:
        return list(range(len(records)))
    salt = splitmix64(split_seed ^ 0x73706c6974)
    return [i for i, (h, _) in enumerate(records)
            if (splitmix64(h ^ salt) >> 11) * 2.0 ** -53 >= valid_fraction]


def epoch_order(indices, seed, epoch):
    """Philox Fisher-Yates from the back (DataLoader::epoch_order)."""
    order = list(indices)
    n = len(order)
    if n < 2:
        return order
    ks = np.arange(n, 1, -1, dtype=np.uint64)
    r0, r1, _, _ = philox_block(stream_key(seed, epoch, SHUFFLE), 0, ks)
    xs = ((r0 << np.uint64(32)) | r1).tolist()
    for k, x in zip(ks.tolist(), xs):
        j = (x * k) >> 64
        order[k - 1], order[j] = order[j], order[k - 1]
    return order


def make_sample(residues, index, seed, epoch, max_residues):
    """(tokens, labels) of one protein: crop, <cls> crop' <eos>, MLM 15% (80% mask, 10% random, 10% kept)."""
    length, start, n = len(residues), 0, len(residues)
    if length > max_residues:
        r = int(philox_block(stream_key(seed, epoch, CROP), index, 0)[0][()])
        start, n = (r * (length - max_residues + 1)) >> 32, max_residues
    pos = np.arange(start, start + n, dtype=np.uint64)  # masks follow the protein, not the crop
    r0, r1, r2, _ = philox_block(stream_key(seed, epoch, MASK), index, pos)
    select = (r0 >> np.uint64(8)).astype(np.float64) / 16777216.0 < 0.15
    action = (r1 >> np.uint64(8)).astype(np.float64) / 16777216.0
    original = residues[start:start + n].astype(np.int64)
    tokens = original.copy()
    tokens[select & (action < 0.8)] = MASK_ID
    random = select & (action >= 0.8) & (action < 0.8 + 0.1)
    tokens[random] = (4 + ((r2 * np.uint64(20)) >> np.uint64(32)).astype(np.int64))[random]
    labels = np.where(select, original, IGNORE)
    return (np.concatenate(([CLS_ID], tokens, [EOS_ID])),
            np.concatenate(([IGNORE], labels, [IGNORE])))


class Batch:
    """One packed THD micro-batch (host numpy arrays)."""

    def __init__(self, samples):
        self.tokens = np.concatenate([t for t, _ in samples]).astype(np.int64)
        self.labels = np.concatenate([l for _, l in samples]).astype(np.int64)
        self.seqlens = [len(t) for t, _ in samples]
        self.cu_seqlens = np.concatenate(([0], np.cumsum(self.seqlens))).astype(np.int32)
        self.max_seqlen = max(self.seqlens)
        self.num_tokens = int(self.cu_seqlens[-1])
        self.num_labels = int((self.labels != IGNORE).sum())
        self.seq_ids = np.repeat(np.arange(len(samples)), self.seqlens).astype(np.int64)
        self.positions = (np.arange(self.num_tokens) - self.cu_seqlens[:-1][self.seq_ids]).astype(np.int64)
        self.samples = samples


def helix_batches(records, count, tokens_per_batch, seed, valid_fraction, max_residues):
    """The first `count` training micro-batches of `helix train` (DataLoader::next, one rank)."""
    indices = train_indices(records, valid_fraction)
    longest = max(min(len(records[i][1]), max_residues) + 2 for i in indices)
    if longest > tokens_per_batch:
        raise ValueError(f"--tokens-per-step {tokens_per_batch} is below the longest sample ({longest} tokens)")
    out, epoch = [], 0
    while len(out) < count:
        order, cut, used = epoch_order(indices, seed, epoch), [], 0
        for i in order:  # greedy cuts (plan_batches)
            need = min(len(records[i][1]), max_residues) + 2
            if not cut or used + need > tokens_per_batch:
                cut.append([])
                used = 0
            cut[-1].append(i)
            used += need
        for ids in cut:
            if len(out) == count:
                break
            out.append(Batch([make_sample(records[i][1], i, seed, epoch, max_residues) for i in ids]))
        epoch += 1
    return out


def lr_at(step, args):
    """LrSchedule::at (launch/lr_schedule.cpp)."""
    if args.lr_warmup > 0 and step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    if args.lr_decay == "constant":
        return args.lr
    span = max(1, args.steps - args.lr_warmup)
    t = min(max((step - args.lr_warmup) / span, 0.0), 1.0)
    frac = 1.0 - t if args.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return args.min_lr + (args.lr - args.min_lr) * frac


# ---- PyTorch models ---------------------------------------------------------------------------------

def make_attention():
    """(backend name, fn(q, k, v, cu_seqlens, max_seqlen) -> out [T, H, D]), softmax scale 1/sqrt(D)."""
    import torch
    try:
        from torch.nn.attention.varlen import varlen_attn

        def attn(q, k, v, cu, max_len):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len)

        return "torch.nn.attention.varlen.varlen_attn", attn
    except ImportError as e:
        print(f"train_torch.py: varlen_attn unavailable ({e}); using aten._flash_attention_forward",
              file=sys.stderr)

        def attn(q, k, v, cu, max_len):
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, False,
                                                           False)[0]

        return "torch.ops.aten._flash_attention_forward", attn


def build_thd_model(layers, hidden, heads, ffn, attn):
    import torch
    import torch.nn.functional as F
    from torch import nn

    head_dim = hidden // heads

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class Embedding(nn.Module):
        """Token embedding with ESM-2 token dropout as HF EsmEmbeddings, per packed sequence."""

        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(VOCAB, hidden, padding_idx=PAD_ID)

        def forward(self, tokens, seq_ids, lengths):  # [T], [T], [b] f32
            x = self.word(tokens)
            is_mask = tokens == MASK_ID
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            masked = torch.zeros_like(lengths).index_add_(0, seq_ids, is_mask.to(lengths.dtype))
            observed = masked / lengths  # per sequence
            return x * (1 - 0.15 * 0.8) / (1 - observed)[seq_ids].unsqueeze(-1)

    class Layer(nn.Module):
        """Pre-LN block: LN, fused QKV, rotary, varlen attention, out-proj + residual, LN, MLP + residual."""

        def __init__(self):
            super().__init__()
            self.ln_attn = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.out = nn.Linear(hidden, hidden)
            self.ln_mlp = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
            self.fc1 = nn.Linear(hidden, ffn)
            self.fc2 = nn.Linear(ffn, hidden)

        def forward(self, x, cos, sin, cu_seqlens, max_seqlen):  # x [T, hidden]; cos, sin [T, 1, 1, D] f32
            t = x.shape[0]
            qkv = self.qkv(self.ln_attn(x)).view(t, 3, heads, head_dim)
            qk = qkv[:, :2].float()  # rotary in fp32 as HF (then back to the compute dtype)
            qk = (qk * cos + rotate_half(qk) * sin).to(qkv.dtype)
            a = attn(qk[:, 0], qk[:, 1], qkv[:, 2], cu_seqlens, max_seqlen)
            x = x + self.out(a.reshape(t, hidden))
            return x + self.fc2(F.gelu(self.fc1(self.ln_mlp(x))))  # erf GELU

    class Head(nn.Module):
        """Final LN, LM head (dense, GELU, LN, decoder tied to the embedding, bias), CE sum over labels."""

        def __init__(self):
            super().__init__()
            self.ln_final = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
            self.dense = nn.Linear(hidden, hidden)
            self.ln = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
            self.bias = nn.Parameter(torch.zeros(VOCAB))

        def forward(self, x, decoder, labels):
            h = self.ln(F.gelu(self.dense(self.ln_final(x))))
            logits = F.linear(h, decoder) + self.bias
            return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")

    class Esm2Thd(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = Embedding()
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.head = Head()
            inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
            self.register_buffer("cos_table", emb.cos(), persistent=False)
            self.register_buffer("sin_table", emb.sin(), persistent=False)

        def forward(self, tokens, labels, positions, seq_ids, lengths, cu_seqlens, max_seqlen):
            x = self.embedding(tokens, seq_ids, lengths)
            cos = self.cos_table[positions][:, None, None, :]
            sin = self.sin_table[positions][:, None, None, :]
            for layer in self.layers:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
            return self.head(x, self.embedding.word.weight, labels)

    model = Esm2Thd()
    # Hugging Face's EsmPreTrainedModel._init_weights: N(0, 0.02) weights, zero biases, LN 1/0, pad row 0.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 0.02)
                m.weight[PAD_ID].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


def build_hf_model(layers, hidden, heads, ffn):
    """transformers' EsmForMaskedLM, random init, sdpa attention. Returns (model, attention name)."""
    from transformers import EsmConfig, EsmForMaskedLM
    cfg = EsmConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=ffn, max_position_embeddings=MAX_POSITIONS,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                    mask_token_id=MASK_ID, pad_token_id=PAD_ID, layer_norm_eps=LAYER_NORM_EPS,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="gelu",
                    tie_word_embeddings=True)
    try:
        model = EsmForMaskedLM._from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError, AttributeError) as e:
        print(f"train_torch.py: _from_config(attn_implementation='sdpa') failed ({e}); setting "
              "config._attn_implementation", file=sys.stderr)
        cfg._attn_implementation = "sdpa"
        model = EsmForMaskedLM(cfg)
    return model.float(), getattr(model.config, "_attn_implementation", "?")


def hf_micro_batches(batch, micro_tokens):
    """The step's proteins sorted by length (longest first), cut so that rows * longest <= micro_tokens;
    each micro-batch padded with <pad> / ignored labels. Returns [(input_ids, attention_mask, labels)]."""
    samples = sorted(batch.samples, key=lambda s: -len(s[0]))
    groups = []
    for s in samples:
        if groups and (len(groups[-1]) + 1) * len(groups[-1][0][0]) <= micro_tokens:
            groups[-1].append(s)
        else:
            groups.append([s])
    out = []
    for g in groups:
        width = len(g[0][0])
        ids = np.full((len(g), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(g), width), dtype=np.int64)
        labels = np.full((len(g), width), IGNORE, dtype=np.int64)
        for r, (t, l) in enumerate(g):
            ids[r, :len(t)], mask[r, :len(t)], labels[r, :len(t)] = t, 1, l
        out.append((ids, mask, labels))
    return out


# ---- Training loop ----------------------------------------------------------------------------------

def adamw(model, args):
    import torch
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices and the embedding (helix: same)
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=args.lr,
                             betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=True)


def pinned(a):
    import torch
    return torch.from_numpy(a).pin_memory()


def setup_thd(args, batches, result):
    """The hand-written model and its forward + backward of step i (returns the step's mean loss)."""
    import torch
    layers, hidden, heads, ffn = PRESETS[args.model]
    dev = torch.device("cuda")
    backend, attn = make_attention()
    result["attention"] = backend
    with torch.device(dev):  # initialise on the GPU (seconds on the CPU at 650M)
        model = build_thd_model(layers, hidden, heads, ffn, attn)
    if args.compile:
        if args.compile_scope == "model":
            model = torch.compile(model, dynamic=True, mode=args.compile_mode)
        else:  # regional: one compiled graph serves every (identical) layer
            for m in [model.embedding, model.head, *model.layers]:
                m.compile(dynamic=True, mode=args.compile_mode)
    host = [dict(tokens=pinned(b.tokens), labels=pinned(b.labels), positions=pinned(b.positions),
                 seq_ids=pinned(b.seq_ids), lengths=pinned(np.asarray(b.seqlens, dtype=np.float32)),
                 cu_seqlens=pinned(b.cu_seqlens)) for b in batches]

    def forward_backward(i):
        d = {k: v.to(dev, non_blocking=True) for k, v in host[i].items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum = model(d["tokens"], d["labels"], d["positions"], d["seq_ids"], d["lengths"],
                             d["cu_seqlens"], batches[i].max_seqlen)
        loss = loss_sum / batches[i].num_labels
        loss.backward()
        return loss.detach()

    return model, forward_backward


def setup_hf(args, batches, result):
    """EsmForMaskedLM and its forward + backward of step i over the padded micro-batches."""
    import torch
    import torch.nn.functional as F
    import transformers
    layers, hidden, heads, ffn = PRESETS[args.model]
    dev = torch.device("cuda")
    model, impl = build_hf_model(layers, hidden, heads, ffn)
    model = model.to(dev)
    result["attention"] = f"transformers EsmForMaskedLM attn_implementation={impl}, padded"
    result["transformers"] = transformers.__version__
    host = [[tuple(pinned(a) for a in mb) for mb in hf_micro_batches(b, args.hf_micro_tokens)] for b in batches]
    result["hf_micro_batches_mean"] = round(sum(len(h) for h in host) / len(host), 2)
    result["hf_padded_tokens_mean"] = round(sum(int(ids.numel()) for h in host for ids, _, _ in h) / len(host), 1)

    def forward_backward(i):
        total = None
        for ids, mask, labels in host[i]:
            ids, mask, labels = (t.to(dev, non_blocking=True) for t in (ids, mask, labels))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float().view(-1, VOCAB), labels.view(-1), ignore_index=IGNORE,
                                   reduction="sum") / batches[i].num_labels
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    return model, forward_backward


def run(args, result):
    """Builds the batches and the model, trains args.steps steps, fills `result`."""
    import torch
    layers, hidden, heads, ffn = PRESETS[args.model]
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)
    result.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    batches = helix_batches(read_fasta(args.data), args.steps, args.tokens_per_step, args.seed,
                            args.valid_fraction, args.max_residues)
    model, forward_backward = (setup_thd if args.mode == "thd" else setup_hf)(args, batches, result)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["parameters"] = sum(p.numel() for p in params)
    opt = adamw(model, args)

    times, loss = [], float("nan")
    warmup_start = time.perf_counter()
    for i in range(args.steps):
        if i == args.warmup:
            torch.cuda.synchronize()
            result["warmup_seconds"] = round(time.perf_counter() - warmup_start, 2)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(i, args)
        step_loss = forward_backward(i)
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = step_loss.item()  # the host waits for the step, as helix's trainer does
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if i == 0:
            result["first_loss"] = round(loss, 4)

    timed = batches[args.warmup:]
    tokens = sum(b.num_tokens for b in timed)
    flops = sum(train_flops(layers, hidden, ffn, b.seqlens) for b in timed)
    seconds = sum(times)
    peak = torch.cuda.max_memory_allocated()
    result.update(
        steps=args.steps, timed_steps=len(timed), tokens=tokens, seconds=round(seconds, 4),
        tokens_per_second=round(tokens / seconds, 1), tflops=round(flops / seconds / 1e12, 2),
        step_seconds_mean=round(seconds / len(times), 5), step_seconds_median=round(float(np.median(times)), 5),
        mem_peak_bytes=peak, mem_peak_gib=round(peak / 2 ** 30, 2),
        mem_reserved_peak_bytes=torch.cuda.max_memory_reserved(), final_loss=round(loss, 4))


def dump_batches(args, count, path):
    """Writes the first `count` batches (what helix trains on with the same flags) as JSON."""
    records = read_fasta(args.data)
    batches = helix_batches(records, count, args.tokens_per_step, args.seed, args.valid_fraction,
                            args.max_residues)
    with open(path, "w") as f:
        json.dump([{"cu_seqlens": b.cu_seqlens.tolist(), "tokens": b.tokens.tolist(), "labels": b.labels.tolist(),
                    "num_tokens": b.num_tokens, "num_labels": b.num_labels} for b in batches], f)
    print(f"wrote {count} batches to {path}: tokens {[b.num_tokens for b in batches]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="esm2-150m", choices=sorted(PRESETS))
    ap.add_argument("--mode", default="thd", choices=["thd", "hf"])
    ap.add_argument("--compile", action="store_true", help="thd: torch.compile (dynamic shapes)")
    ap.add_argument("--compile-scope", default="layers", choices=["layers", "model"],
                    help="layers: each layer, embedding and head (regional compilation); model: whole model")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--tokens-per-step", type=int, default=16384)
    ap.add_argument("--hf-micro-tokens", type=int, default=None,
                    help="hf: padded tokens per micro-batch (default: --tokens-per-step)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps in all (as helix train --steps)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--valid-fraction", type=float, default=0.01)
    ap.add_argument("--max-residues", type=int, default=1022)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--lr-warmup", type=int, default=0)
    ap.add_argument("--lr-decay", default="linear", choices=["constant", "linear", "cosine"])
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--adam-eps", type=float, default=1e-8)
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--out", help="append the JSON line to this file too")
    ap.add_argument("--self-test", action="store_true", help="check the Philox port (numpy only) and exit")
    ap.add_argument("--dump-batches", nargs=2, metavar=("COUNT", "FILE"),
                    help="write the first COUNT batches as JSON (numpy only) and exit")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return 0
    if args.dump_batches:
        dump_batches(args, int(args.dump_batches[0]), args.dump_batches[1])
        return 0
    if args.hf_micro_tokens is None:
        args.hf_micro_tokens = args.tokens_per_step
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup: expected 0 <= warmup < steps ({args.steps}), got {args.warmup}")
    if args.compile and args.mode != "thd":
        ap.error("--compile applies to --mode thd")

    mode = "hf-sdpa" if args.mode == "hf" else ("thd-compiled" if args.compile else "thd-eager")
    result = {"impl": "torch", "model": args.model, "mode": mode, "tokens_per_step": args.tokens_per_step}
    rc = 0
    try:
        run(args, result)
    except Exception as e:  # one clear line per failed configuration (OOM, missing op, ...)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        rc = 1
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
