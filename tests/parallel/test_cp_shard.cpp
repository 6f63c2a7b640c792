// Context-parallel batch sharding (parallel/cp_shard.h): the chunk layout against a hand-worked
// example, unshard(shard) == identity on random batches, positions and per-rank THD invariants,
// sequence-aware placement (hand example, balance, determinism) and validation. Single process.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "core/error.h"
#include "parallel/cp_shard.h"

namespace helix {
namespace {

using V = std::vector<int32_t>;

// A global batch of sequences with real lengths `lens` in slots of `slots` tokens (pad 1, label -100
// in the padding). Token of row t is 1000 + t so every row is recognisable.
ThdBatch make_batch(const V& lens, const V& slots, uint64_t seed) {
  std::mt19937 gen(static_cast<uint32_t>(seed));
  V tokens, labels, cu{0}, cup{0};
  for (size_t i = 0; i < lens.size(); ++i) {
    for (int32_t p = 0; p < slots[i]; ++p) {
      const bool real = p < lens[i];
      tokens.push_back(real ? 1000 + static_cast<int32_t>(tokens.size()) : 1);
      labels.push_back(real && gen() % 3 == 0 ? static_cast<int32_t>(gen() % 33) : -100);
    }
    cu.push_back(cu.back() + lens[i]);
    cup.push_back(cup.back() + slots[i]);
  }
  ThdBatch b;
  const auto n = static_cast<int64_t>(tokens.size()), nb = static_cast<int64_t>(cu.size());
  b.tokens = Tensor::from_vector(tokens, {n});
  b.labels = Tensor::from_vector(labels, {n});
  b.cu_seqlens = Tensor::from_vector(cu, {nb});
  b.cu_seqlens_padded = Tensor::from_vector(cup, {nb});
  b.num_tokens = cu.back();
  return b;
}

TEST(CpShard, HandWorkedCp2Lengths5And11) {
  // Lengths 5 and 11 without padding, cp = 2: padded to 8 and 12, chunks of 2 and 3.
  // Sequence 0 (tokens 1000..1004): rank 0 keeps chunks 0 [0,2) and 3 [6,8) -> 1000 1001 pad pad;
  //   rank 1 keeps chunks 1 [2,4) and 2 [4,6) -> 1002 1003 1004 pad.
  // Sequence 1 (tokens 1005..1015): rank 0 keeps [0,3) and [9,12) -> 1005 1006 1007 1014 1015 pad;
  //   rank 1 keeps [3,6) and [6,9) -> 1008 .. 1013.
  const ThdBatch g = make_batch({5, 11}, {5, 11}, 1);
  const CpShard r0 = cp_shard_batch(g, 2, 0), r1 = cp_shard_batch(g, 2, 1);
  EXPECT_EQ(r0.batch.tokens.to_vector<int32_t>(), (V{1000, 1001, 1, 1, 1005, 1006, 1007, 1014, 1015, 1}));
  EXPECT_EQ(r1.batch.tokens.to_vector<int32_t>(),
            (V{1002, 1003, 1004, 1, 1008, 1009, 1010, 1011, 1012, 1013}));
  EXPECT_EQ(r0.batch.positions.to_vector<int32_t>(), (V{0, 1, 6, 7, 0, 1, 2, 9, 10, 11}));
  EXPECT_EQ(r1.batch.positions.to_vector<int32_t>(), (V{2, 3, 4, 5, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(r0.batch.cu_seqlens.to_vector<int32_t>(), (V{0, 2, 7}));
  EXPECT_EQ(r1.batch.cu_seqlens.to_vector<int32_t>(), (V{0, 3, 9}));
  EXPECT_EQ(r0.batch.cu_seqlens_padded.to_vector<int32_t>(), (V{0, 4, 10}));
  EXPECT_EQ(r1.batch.cu_seqlens_padded.to_vector<int32_t>(), (V{0, 4, 10}));
  EXPECT_EQ(r0.batch.max_seqlen, 5);
  EXPECT_EQ(r1.batch.max_seqlen, 6);
  EXPECT_EQ(r0.batch.num_tokens, 7);
  EXPECT_EQ(r1.batch.num_tokens, 9);
  // Labels follow the tokens; padding rows carry -100.
  const V gl = g.labels.to_vector<int32_t>();
  EXPECT_EQ(r0.batch.labels.to_vector<int32_t>(),
            (V{gl[0], gl[1], -100, -100, gl[5], gl[6], gl[7], gl[14], gl[15], -100}));
  // Layout metadata for the attention code.
  EXPECT_EQ(r0.layout.seq_index, (V{0, 1}));
  EXPECT_EQ(r0.layout.split, (std::vector<uint8_t>{1, 1}));
  EXPECT_EQ(r0.layout.global_len, (V{5, 11}));
  EXPECT_EQ(r0.layout.padded_len, (V{8, 12}));
  EXPECT_EQ(r0.layout.chunk0_begin, (V{0, 0}));
  EXPECT_EQ(r0.layout.chunk0_end, (V{2, 3}));
  EXPECT_EQ(r0.layout.chunk1_begin, (V{6, 9}));
  EXPECT_EQ(r0.layout.chunk1_end, (V{8, 12}));
  EXPECT_EQ(r1.layout.chunk0_begin, (V{2, 3}));
  EXPECT_EQ(r1.layout.chunk1_begin, (V{4, 6}));
  EXPECT_EQ(r0.layout.global_row, (std::vector<int64_t>{0, 1, -1, -1, 5, 6, 7, 14, 15, -1}));
}

// Checks one sharding of `g` over cp ranks: identity through unshard, every real token once, global
// positions, the per-rank THD invariants and split slots = padded / cp.
void check_roundtrip(const ThdBatch& g, int cp, const CpShardOptions& opt) {
  const V cu = g.cu_seqlens.to_vector<int32_t>(), cup = g.cu_seqlens_padded.to_vector<int32_t>();
  const std::vector<int> owner = cp_place_sequences(g, cp, opt);
  std::vector<Tensor> toks, labs;
  std::vector<CpLayout> lays;
  int64_t real_total = 0;
  std::vector<int> seen(static_cast<size_t>(g.total_tokens()), 0);
  for (int r = 0; r < cp; ++r) {
    const CpShard s = cp_shard_batch(g, cp, r, opt);
    toks.push_back(s.batch.tokens);
    labs.push_back(s.batch.labels);
    lays.push_back(s.layout);
    const V lcu = s.batch.cu_seqlens.to_vector<int32_t>(), lcup = s.batch.cu_seqlens_padded.to_vector<int32_t>();
    const V pos = s.batch.positions.to_vector<int32_t>(), tok = s.batch.tokens.to_vector<int32_t>();
    const V lab = s.batch.labels.to_vector<int32_t>();
    ASSERT_EQ(lcup.back(), s.batch.total_tokens());
    ASSERT_EQ(s.layout.global_row.size(), static_cast<size_t>(s.batch.total_tokens()));
    for (size_t k = 0; k < s.layout.seq_index.size(); ++k) {
      const auto i = static_cast<size_t>(s.layout.seq_index[k]);
      const int32_t len = cu[i + 1] - cu[i], slot = cup[i + 1] - cup[i];
      EXPECT_EQ(s.layout.split[k] == 0, owner[i] == r);
      const int32_t local_slot = lcup[k + 1] - lcup[k];
      if (s.layout.split[k]) {
        const int32_t padded = (slot + 2 * cp - 1) / (2 * cp) * (2 * cp);
        EXPECT_EQ(local_slot, padded / cp);
      } else {
        EXPECT_EQ(local_slot, slot);
      }
      const int32_t real = lcu[k + 1] - lcu[k];
      real_total += real;
      for (int32_t j = 0; j < local_slot; ++j) {
        const size_t row = static_cast<size_t>(lcup[k] + j);
        const int64_t grow = s.layout.global_row[row];
        // Real tokens are a prefix of the slot; a row's position is its place in the sequence.
        EXPECT_EQ(j < real, pos[row] < len) << "rank " << r << " seq " << i << " row " << j;
        if (grow >= 0) {
          EXPECT_EQ(grow, int64_t{cup[i]} + pos[row]);
          if (pos[row] < len) ++seen[static_cast<size_t>(grow)];
        } else {
          EXPECT_GE(pos[row], slot);
          EXPECT_EQ(tok[row], 1);
          EXPECT_EQ(lab[row], -100);
        }
      }
    }
  }
  EXPECT_EQ(real_total, g.num_tokens);
  for (size_t i = 0; i + 1 < cu.size(); ++i)
    for (int32_t t = cup[i]; t < cup[i] + cu[i + 1] - cu[i]; ++t)
      EXPECT_EQ(seen[static_cast<size_t>(t)], 1) << "real token row " << t;
  EXPECT_EQ(cp_unshard_rows(toks, lays, g.total_tokens()).to_vector<int32_t>(), g.tokens.to_vector<int32_t>());
  EXPECT_EQ(cp_unshard_rows(labs, lays, g.total_tokens()).to_vector<int32_t>(), g.labels.to_vector<int32_t>());
}

TEST(CpShard, UnshardOfShardIsIdentityOnRandomBatches) {
  for (int cp : {1, 2, 4}) {
    for (uint64_t seed = 1; seed <= 12; ++seed) {
      std::mt19937 gen(static_cast<uint32_t>(seed * 7919 + cp));
      const int b = 1 + static_cast<int>(gen() % 7);
      V lens, slots;
      for (int i = 0; i < b; ++i) {
        lens.push_back(1 + static_cast<int32_t>(gen() % 70));
        // Sometimes the data pipeline already padded the slot (to 8 here), sometimes not.
        slots.push_back(gen() % 2 ? lens.back() : (lens.back() + 7) / 8 * 8);
      }
      const ThdBatch g = make_batch(lens, slots, seed);
      for (int32_t min_len : {0, 24, 1000}) {
        SCOPED_TRACE("cp " + std::to_string(cp) + " seed " + std::to_string(seed) + " split_min_len " +
                     std::to_string(min_len));
        check_roundtrip(g, cp, {.split_min_len = min_len});
      }
    }
  }
}

TEST(CpShard, UnshardRowsOfFeatures) {
  // Rows of [T, 3] floats (what a gather of activations would carry) round-trip too.
  const ThdBatch g = make_batch({7, 13, 2}, {7, 16, 2}, 3);
  const int cp = 4;
  std::vector<Tensor> rows;
  std::vector<CpLayout> lays;
  for (int r = 0; r < cp; ++r) {
    const CpShard s = cp_shard_batch(g, cp, r, {.split_min_len = 8});
    std::vector<float> v;
    for (int64_t gr : s.layout.global_row)
      for (int c = 0; c < 3; ++c) v.push_back(static_cast<float>(gr * 10 + c));
    rows.push_back(Tensor::from_vector(v, {static_cast<int64_t>(s.layout.global_row.size()), 3}));
    lays.push_back(s.layout);
  }
  const Tensor out = cp_unshard_rows(rows, lays, g.total_tokens());
  ASSERT_EQ(out.shape(), (Shape{g.total_tokens(), 3}));
  const std::vector<float> v = out.to_vector<float>();
  for (int64_t t = 0; t < g.total_tokens(); ++t)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(v[static_cast<size_t>(t * 3 + c)], float(t * 10 + c));
  // A missing rank leaves global rows uncovered.
  rows.pop_back();
  lays.pop_back();
  EXPECT_THROW(cp_unshard_rows(rows, lays, g.total_tokens()), Error);
}

TEST(CpShard, PlacementHandWorked) {
  // cp 2, lengths 3 10 4 4 2, split_min_len 8: sequence 1 is split; the short ones by cost desc
  // (index asc on ties): 2 (16) -> rank 0; 3 (16) -> rank 1; 0 (9): costs tie 16/16, tokens tie 4/4,
  // lowest rank -> 0; 4 (4): rank 1 (16 < 25).
  const ThdBatch g = make_batch({3, 10, 4, 4, 2}, {3, 10, 4, 4, 2}, 5);
  EXPECT_EQ(cp_place_sequences(g, 2, {.split_min_len = 8}), (std::vector<int>{0, -1, 0, 1, 1}));
  const CpShard r0 = cp_shard_batch(g, 2, 0, {.split_min_len = 8});
  const CpShard r1 = cp_shard_batch(g, 2, 1, {.split_min_len = 8});
  EXPECT_EQ(r0.layout.seq_index, (V{0, 1, 2}));
  EXPECT_EQ(r0.layout.split, (std::vector<uint8_t>{0, 1, 0}));
  EXPECT_EQ(r1.layout.seq_index, (V{1, 3, 4}));
  // Rank 0: sequence 0 whole (3), sequence 1 padded to 12, chunks [0,3)+[9,12) (3 + 1 real), seq 2.
  EXPECT_EQ(r0.batch.cu_seqlens.to_vector<int32_t>(), (V{0, 3, 7, 11}));
  EXPECT_EQ(r0.batch.cu_seqlens_padded.to_vector<int32_t>(), (V{0, 3, 9, 13}));
  EXPECT_EQ(r0.batch.positions.to_vector<int32_t>(), (V{0, 1, 2, 0, 1, 2, 9, 10, 11, 0, 1, 2, 3}));
  EXPECT_EQ(r1.batch.cu_seqlens.to_vector<int32_t>(), (V{0, 6, 10, 12}));
  EXPECT_EQ(r1.batch.cu_seqlens_padded.to_vector<int32_t>(), (V{0, 6, 10, 12}));
}

TEST(CpShard, PlacementBalancedAndDeterministic) {
  for (int cp : {2, 4}) {
    for (uint64_t seed = 1; seed <= 20; ++seed) {
      std::mt19937 gen(static_cast<uint32_t>(seed));
      V lens;
      for (int i = 0; i < 20; ++i) lens.push_back(1 + static_cast<int32_t>(gen() % 300));
      const ThdBatch g = make_batch(lens, lens, seed);
      const CpShardOptions opt{.split_min_len = 200};
      const std::vector<int> owner = cp_place_sequences(g, cp, opt);
      EXPECT_EQ(owner, cp_place_sequences(g, cp, opt));
      std::vector<int64_t> cost(static_cast<size_t>(cp), 0);
      int64_t max_item = 0;
      for (size_t i = 0; i < lens.size(); ++i) {
        EXPECT_EQ(owner[i] < 0, lens[i] >= 200);
        if (owner[i] < 0) continue;
        ASSERT_LT(owner[i], cp);
        const int64_t c = int64_t{lens[i]} * lens[i];
        cost[static_cast<size_t>(owner[i])] += c;
        max_item = std::max(max_item, c);
      }
      // Greedy heaviest-first: the spread never exceeds the largest single cost.
      const auto [lo, hi] = std::minmax_element(cost.begin(), cost.end());
      EXPECT_LE(*hi - *lo, max_item) << "cp " << cp << " seed " << seed;
      // Shards are reproducible call to call.
      for (int r = 0; r < cp; ++r) {
        EXPECT_EQ(cp_shard_batch(g, cp, r, opt).batch.tokens.to_vector<int32_t>(),
                  cp_shard_batch(g, cp, r, opt).batch.tokens.to_vector<int32_t>());
      }
    }
  }
}

TEST(CpShard, RankWithNoSequences) {
  // One short sequence, cp 4: three ranks hold an empty batch.
  const ThdBatch g = make_batch({5}, {5}, 9);
  const std::vector<int> owner = cp_place_sequences(g, 4, {.split_min_len = 64});
  EXPECT_EQ(owner, (std::vector<int>{0}));
  const CpShard s = cp_shard_batch(g, 4, 3, {.split_min_len = 64});
  EXPECT_EQ(s.batch.total_tokens(), 0);
  EXPECT_EQ(s.batch.num_sequences(), 0);
  EXPECT_EQ(s.batch.cu_seqlens.to_vector<int32_t>(), (V{0}));
}

TEST(CpShard, ValidationErrors) {
  const ThdBatch g = make_batch({5, 11}, {5, 11}, 1);
  EXPECT_THROW(cp_shard_batch(g, 0, 0), Error);
  EXPECT_THROW(cp_shard_batch(g, -2, 0), Error);
  EXPECT_THROW(cp_shard_batch(g, 2, 2), Error);
  EXPECT_THROW(cp_shard_batch(g, 2, -1), Error);
  EXPECT_THROW(cp_shard_batch(g, 2, 0, {.split_min_len = -1}), Error);
  ThdBatch bad = g;
  bad.cu_seqlens = Tensor::from_vector(V{0, 5, 17}, {3});  // sequence 1 longer than its slot
  EXPECT_THROW(cp_shard_batch(bad, 2, 0), Error);
  bad = g;
  bad.tokens = g.tokens.slice(0, 10);
  EXPECT_THROW(cp_shard_batch(bad, 2, 0), Error);
  try {
    cp_shard_batch(g, 2, 5);
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected 0 <= rank < cp = 2, got 5"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace helix
