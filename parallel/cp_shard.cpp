// Context-parallel batch sharding (see cp_shard.h and docs/context-parallel.md).
#include "parallel/cp_shard.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/error.h"

namespace helix {
namespace {

constexpr int32_t kIgnoreLabel = -100;

struct GlobalView {
  std::vector<int32_t> tokens, labels, cu, cu_padded;
};

GlobalView read_global(const ThdBatch& g, int cp) {
  HELIX_CHECK(cp >= 1, "cp_shard: expected cp >= 1, got {}", cp);
  HELIX_CHECK(g.tokens.defined() && g.labels.defined() && g.cu_seqlens.defined() &&
                  g.cu_seqlens_padded.defined(),
              "cp_shard: expected a batch with tokens, labels, cu_seqlens and cu_seqlens_padded");
  for (const Tensor* t : {&g.tokens, &g.labels, &g.cu_seqlens, &g.cu_seqlens_padded}) {
    HELIX_CHECK(t->is_cpu() && t->dtype() == DType::kI32 && t->shape().ndim() == 1,
                "cp_shard: expected a CPU i32 vector, got {}", t->str());
  }
  GlobalView v{g.tokens.to_vector<int32_t>(), g.labels.to_vector<int32_t>(),
               g.cu_seqlens.to_vector<int32_t>(), g.cu_seqlens_padded.to_vector<int32_t>()};
  HELIX_CHECK(!v.cu.empty() && v.cu.size() == v.cu_padded.size(),
              "cp_shard: expected cu_seqlens and cu_seqlens_padded of equal length >= 1, got {} and {}",
              v.cu.size(), v.cu_padded.size());
  HELIX_CHECK(v.labels.size() == v.tokens.size(), "cp_shard: expected labels of {} rows, got {}",
              v.tokens.size(), v.labels.size());
  HELIX_CHECK(v.cu[0] == 0 && v.cu_padded[0] == 0, "cp_shard: expected cu_seqlens starting at 0");
  HELIX_CHECK(static_cast<size_t>(v.cu_padded.back()) == v.tokens.size(),
              "cp_shard: expected cu_seqlens_padded[b] = {} tokens, got {}", v.tokens.size(),
              v.cu_padded.back());
  for (size_t i = 0; i + 1 < v.cu.size(); ++i) {
    const int32_t s = v.cu[i + 1] - v.cu[i], slot = v.cu_padded[i + 1] - v.cu_padded[i];
    HELIX_CHECK(s >= 0 && slot >= s, "cp_shard: sequence {}: expected 0 <= length <= padded slot, got {} and {}",
                i, s, slot);
  }
  return v;
}

int32_t round_up(int32_t x, int32_t m) { return (x + m - 1) / m * m; }

}  // namespace

std::vector<int> cp_place_sequences(const ThdBatch& global, int cp, const CpShardOptions& opt) {
  HELIX_CHECK(cp >= 1, "cp_place_sequences: expected cp >= 1, got {}", cp);
  HELIX_CHECK(opt.split_min_len >= 0, "cp_place_sequences: expected split_min_len >= 0, got {}",
              opt.split_min_len);
  const Tensor cu_t = global.cu_seqlens_host.defined() ? global.cu_seqlens_host : global.cu_seqlens;
  const Tensor cp_t =
      global.cu_seqlens_padded_host.defined() ? global.cu_seqlens_padded_host : global.cu_seqlens_padded;
  const std::vector<int32_t> cu = cu_t.to_vector<int32_t>(), cup = cp_t.to_vector<int32_t>();
  const size_t b = cu.size() - 1;
  std::vector<int> owner(b, -1);
  // Short sequences, heaviest first: cost s^2 desc, then padded slot desc, then index asc.
  std::vector<size_t> shorts;
  for (size_t i = 0; i < b; ++i)
    if (cup[i + 1] - cup[i] < opt.split_min_len) shorts.push_back(i);
  const auto len = [&](size_t i) { return int64_t{cu[i + 1] - cu[i]}; };
  const auto slot = [&](size_t i) { return int64_t{cup[i + 1] - cup[i]}; };
  std::stable_sort(shorts.begin(), shorts.end(), [&](size_t a, size_t c) {
    if (len(a) * len(a) != len(c) * len(c)) return len(a) * len(a) > len(c) * len(c);
    return slot(a) > slot(c);
  });
  // Each goes to the rank with the least (cost, tokens, rank). Split sequences load every rank
  // equally, so they do not change the choice.
  std::vector<int64_t> cost(static_cast<size_t>(cp), 0), tokens(static_cast<size_t>(cp), 0);
  for (size_t i : shorts) {
    size_t best = 0;
    for (size_t r = 1; r < static_cast<size_t>(cp); ++r) {
      if (cost[r] < cost[best] || (cost[r] == cost[best] && tokens[r] < tokens[best])) best = r;
    }
    owner[i] = static_cast<int>(best);
    cost[best] += len(i) * len(i);
    tokens[best] += slot(i);
  }
  return owner;
}

CpShard cp_shard_batch(const ThdBatch& global, int cp, int rank, const CpShardOptions& opt) {
  const GlobalView g = read_global(global, cp);
  HELIX_CHECK(rank >= 0 && rank < cp, "cp_shard_batch: expected 0 <= rank < cp = {}, got {}", cp, rank);
  const std::vector<int> owner = cp_place_sequences(global, cp, opt);
  const size_t b = g.cu.size() - 1;

  CpShard out;
  CpLayout& L = out.layout;
  L.cp = cp;
  L.rank = rank;
  std::vector<int32_t> tokens, labels, positions, cu{0}, cu_padded{0};
  int32_t max_len = 0;
  int64_t num_labels = 0;
  // Appends sequence positions [begin, end) of global sequence i; returns its real tokens.
  const auto append = [&](size_t i, int32_t begin, int32_t end) {
    const int32_t s = g.cu[i + 1] - g.cu[i], slot = g.cu_padded[i + 1] - g.cu_padded[i];
    int32_t real = 0;
    for (int32_t p = begin; p < end; ++p) {
      const bool in_slot = p < slot;
      const int64_t row = in_slot ? int64_t{g.cu_padded[i]} + p : -1;
      tokens.push_back(in_slot ? g.tokens[static_cast<size_t>(row)] : opt.pad_id);
      labels.push_back(in_slot ? g.labels[static_cast<size_t>(row)] : kIgnoreLabel);
      positions.push_back(p);
      L.global_row.push_back(row);
      if (p < s) ++real;
      if (labels.back() != kIgnoreLabel) ++num_labels;
    }
    return real;
  };
  for (size_t i = 0; i < b; ++i) {
    const int32_t s = g.cu[i + 1] - g.cu[i], slot = g.cu_padded[i + 1] - g.cu_padded[i];
    int32_t c0b, c0e, c1b, c1e, padded;
    if (owner[i] >= 0) {
      if (owner[i] != rank) continue;
      padded = slot;
      c0b = 0, c0e = slot, c1b = slot, c1e = slot;
    } else {
      padded = round_up(slot, 2 * cp);
      const int32_t c = padded / (2 * cp);
      c0b = rank * c, c0e = c0b + c;
      c1b = (2 * cp - 1 - rank) * c, c1e = c1b + c;
    }
    // Padding sits at the end of the sequence and chunk0 precedes chunk1, so the real tokens of the
    // rank's rows are a prefix of its slot (the THD invariant holds per rank).
    const int32_t real = append(i, c0b, c0e) + append(i, c1b, c1e);
    L.seq_index.push_back(static_cast<int32_t>(i));
    L.split.push_back(owner[i] < 0 ? 1 : 0);
    L.global_len.push_back(s);
    L.padded_len.push_back(padded);
    L.chunk0_begin.push_back(c0b);
    L.chunk0_end.push_back(c0e);
    L.chunk1_begin.push_back(c1b);
    L.chunk1_end.push_back(c1e);
    cu.push_back(cu.back() + real);
    cu_padded.push_back(cu_padded.back() + (c0e - c0b) + (c1e - c1b));
    max_len = std::max(max_len, real);
  }

  ThdBatch& B = out.batch;
  const int64_t T = static_cast<int64_t>(tokens.size()), nb = static_cast<int64_t>(cu.size());
  B.tokens = Tensor::from_vector(tokens, {T});
  B.labels = Tensor::from_vector(labels, {T});
  B.positions = Tensor::from_vector(positions, {T});
  B.cu_seqlens = Tensor::from_vector(cu, {nb});
  B.cu_seqlens_padded = Tensor::from_vector(cu_padded, {nb});
  B.cu_seqlens_host = B.cu_seqlens;
  B.cu_seqlens_padded_host = B.cu_seqlens_padded;
  B.max_seqlen = max_len;
  B.num_tokens = cu.back();
  B.num_labels = num_labels;
  return out;
}

Tensor cp_unshard_rows(const std::vector<Tensor>& rank_rows, const std::vector<CpLayout>& layouts,
                       int64_t global_rows) {
  HELIX_CHECK(!rank_rows.empty() && rank_rows.size() == layouts.size(),
              "cp_unshard_rows: expected one layout per rank tensor (>= 1), got {} tensors and {} layouts",
              rank_rows.size(), layouts.size());
  const Tensor& first = rank_rows[0];
  std::vector<int64_t> dims = first.shape().vec();
  HELIX_CHECK(!dims.empty(), "cp_unshard_rows: expected tensors with a row dimension, got {}", first.str());
  dims[0] = global_rows;
  Tensor out = Tensor::empty(Shape(dims), first.dtype());
  const size_t row_bytes =
      dims[0] == 0 ? 0 : out.nbytes() / static_cast<size_t>(global_rows);
  std::vector<uint8_t> seen(static_cast<size_t>(global_rows), 0);
  for (size_t r = 0; r < rank_rows.size(); ++r) {
    const Tensor& t = rank_rows[r];
    std::vector<int64_t> td = t.shape().vec();
    HELIX_CHECK(t.is_cpu() && t.is_contiguous() && t.dtype() == first.dtype(),
                "cp_unshard_rows: rank {}: expected a contiguous CPU {} tensor, got {}", r,
                dtype_name(first.dtype()), t.str());
    HELIX_CHECK(!td.empty() && td[0] == static_cast<int64_t>(layouts[r].global_row.size()) &&
                    std::equal(td.begin() + 1, td.end(), dims.begin() + 1, dims.end()),
                "cp_unshard_rows: rank {}: expected [{}, ...] matching rank 0's row shape, got {}", r,
                layouts[r].global_row.size(), t.str());
    const auto* src = static_cast<const uint8_t*>(t.data_ptr());
    auto* dst = static_cast<uint8_t*>(out.data_ptr());
    for (size_t j = 0; j < layouts[r].global_row.size(); ++j) {
      const int64_t g = layouts[r].global_row[j];
      if (g < 0) continue;
      HELIX_CHECK(g < global_rows && !seen[static_cast<size_t>(g)],
                  "cp_unshard_rows: global row {} out of range [0, {}) or covered twice", g, global_rows);
      seen[static_cast<size_t>(g)] = 1;
      if (row_bytes) std::memcpy(dst + static_cast<size_t>(g) * row_bytes, src + j * row_bytes, row_bytes);
    }
  }
  const auto missing = std::find(seen.begin(), seen.end(), 0);
  HELIX_CHECK(missing == seen.end(), "cp_unshard_rows: global row {} is held by no rank",
              missing - seen.begin());
  return out;
}

}  // namespace helix
