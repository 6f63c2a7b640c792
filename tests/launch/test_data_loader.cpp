// Crop, MLM masking statistics, THD packing invariants, shuffling, split, data-parallel sharding,
// determinism and resume from a cursor, and the bundled Swiss-Prot proteins.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "launch/data/dataset.h"
#include "launch/data/loader.h"
#include "launch/data/packing.h"
#include "launch/data/sample.h"
#include "launch/data/tokenizer.h"

namespace helix {
namespace {

const std::string kStandard = "LAGVSERTIDPKQNFYMHWC";  // ids 4..23

// `n` proteins of standard amino acids with lengths in [min_len, max_len], drawn from Philox.
std::shared_ptr<ProteinDataset> random_dataset(int64_t n, int64_t min_len, int64_t max_len,
                                               uint64_t seed = 11) {
  auto data = std::make_shared<ProteinDataset>();
  for (int64_t r = 0; r < n; ++r) {
    const auto len = min_len + static_cast<int64_t>(philox_u32(seed, static_cast<uint64_t>(r), 0) %
                                                    static_cast<uint32_t>(max_len - min_len + 1));
    std::string s;
    for (int64_t i = 0; i < len; ++i)
      s += kStandard[philox_u32(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(i + 1)) % 20];
    data->add("prot" + std::to_string(r), s);
  }
  return data;
}

std::vector<int64_t> all_indices(const ProteinDataset& d) {
  return split_indices(d, Split::kAll, {});
}

std::vector<int32_t> ints(const Tensor& t) { return t.to_vector<int32_t>(); }

// Exact equality of two batches, field by field.
void expect_same_batch(const PackedBatch& a, const PackedBatch& b) {
  EXPECT_EQ(ints(a.tokens), ints(b.tokens));
  EXPECT_EQ(ints(a.labels), ints(b.labels));
  EXPECT_EQ(ints(a.cu_seqlens), ints(b.cu_seqlens));
  EXPECT_EQ(ints(a.cu_seqlens_padded), ints(b.cu_seqlens_padded));
  EXPECT_EQ(a.indices, b.indices);
  EXPECT_EQ(a.max_seqlen, b.max_seqlen);
  EXPECT_EQ(a.num_tokens, b.num_tokens);
  EXPECT_EQ(a.epoch, b.epoch);
  EXPECT_EQ(a.global_index, b.global_index);
}

TEST(Sample, CropWindow) {
  SampleParams p{.seed = 3, .epoch = 0, .index = 0, .max_residues = 1022};
  EXPECT_EQ(crop_window(500, p).start, 0);
  EXPECT_EQ(crop_window(500, p).length, 500);
  EXPECT_EQ(crop_window(1022, p).length, 1022);
  int64_t lo = 1 << 30, hi = -1;
  std::set<int64_t> starts;
  for (int64_t i = 0; i < 4000; ++i) {
    p.index = i;
    const CropWindow w = crop_window(3000, p);
    EXPECT_EQ(w.length, 1022);
    EXPECT_GE(w.start, 0);
    EXPECT_LE(w.start, 3000 - 1022);
    lo = std::min(lo, w.start);
    hi = std::max(hi, w.start);
    starts.insert(w.start);
  }
  EXPECT_LT(lo, 10);  // uniform over [0, 1978]: both ends are reached
  EXPECT_GT(hi, 1978 - 10);
  EXPECT_GT(starts.size(), 1200u);
  // Keyed by the epoch: the same protein is cropped elsewhere next epoch.
  p.index = 7;
  const int64_t s0 = crop_window(30000, p).start;
  p.epoch = 1;
  EXPECT_NE(crop_window(30000, p).start, s0);
}

TEST(Sample, CroppedSampleKeepsAContiguousWindow) {
  auto data = random_dataset(1, 2500, 2500);
  const auto res = data->residues(0);
  SampleParams p{.seed = 9, .epoch = 2, .index = 0, .max_residues = 100};
  p.masking.select_prob = 0.0;  // no masking: the sample is exactly the window
  std::vector<int32_t> tok(102), lab(102);
  EXPECT_EQ(make_sample(res, p, tok.data(), lab.data()), 102);
  const CropWindow w = crop_window(2500, p);
  EXPECT_EQ(tok[0], kEsmClsId);
  EXPECT_EQ(tok[101], kEsmEosId);
  for (int j = 0; j < 100; ++j) EXPECT_EQ(tok[j + 1], res[w.start + j]);
  for (int32_t l : lab) EXPECT_EQ(l, kIgnoreLabel);
}

TEST(Sample, MaskingStatistics) {
  // ~1.5M residue positions; standard amino acids only, so "random" and "kept" can be told apart
  // up to the 1/20 chance that the random amino acid equals the original.
  auto data = random_dataset(2000, 50, 1500);
  int64_t positions = 0, selected = 0, masked = 0, random_changed = 0, kept = 0;
  std::vector<int64_t> random_hist(kEsmVocabSize, 0);
  std::vector<int32_t> tok(1024), lab(1024);
  for (int64_t i = 0; i < data->size(); ++i) {
    const SampleParams p{.seed = 1234, .epoch = 0, .index = i, .max_residues = 1022};
    const auto res = data->residues(i);
    const CropWindow w = crop_window(static_cast<int64_t>(res.size()), p);
    const int64_t n = make_sample(res, p, tok.data(), lab.data());
    ASSERT_EQ(n, w.length + 2);
    ASSERT_EQ(tok[0], kEsmClsId);
    ASSERT_EQ(lab[0], kIgnoreLabel);
    ASSERT_EQ(tok[n - 1], kEsmEosId);
    ASSERT_EQ(lab[n - 1], kIgnoreLabel);
    for (int64_t j = 1; j + 1 < n; ++j) {
      const int32_t original = res[w.start + j - 1];
      ++positions;
      if (lab[j] == kIgnoreLabel) {
        ASSERT_EQ(tok[j], original) << "an unlabelled position must keep its residue";
        continue;
      }
      ASSERT_EQ(lab[j], original) << "the label is the original residue";
      ++selected;
      if (tok[j] == kEsmMaskId) {
        ++masked;
      } else if (tok[j] == original) {
        ++kept;
      } else {
        ++random_changed;
        ASSERT_GE(tok[j], kEsmFirstStandardId);
        ASSERT_LT(tok[j], kEsmFirstStandardId + kEsmNumStandard);
      }
      if (tok[j] != kEsmMaskId) ++random_hist[static_cast<size_t>(tok[j])];
    }
  }
  ASSERT_GT(positions, 1000000);
  const double sel = double(selected) / double(positions);
  EXPECT_NEAR(sel, 0.15, 0.002);                                // sigma ~ 3e-4
  EXPECT_NEAR(double(masked) / double(selected), 0.80, 0.006);  // sigma ~ 1.3e-3
  EXPECT_NEAR(double(random_changed) / double(selected), 0.10 * 19.0 / 20.0, 0.004);
  EXPECT_NEAR(double(kept) / double(selected), 0.10 + 0.10 / 20.0, 0.004);
  // Random and kept tokens are standard amino acids, never specials or X/B/U/Z/O/./-.
  for (int32_t t = 0; t < kEsmVocabSize; ++t)
    if (t < kEsmFirstStandardId || t >= kEsmFirstStandardId + kEsmNumStandard)
      EXPECT_EQ(random_hist[t], 0) << t;
}

TEST(Sample, RandomReplacementIsUniformOverStandardAminoAcids) {
  // All-leucine proteins, every position selected, every selected one replaced at random.
  ProteinDataset data;
  data.add("l", std::string(1000, 'L'));
  std::vector<int64_t> hist(kEsmVocabSize, 0);
  std::vector<int32_t> tok(1002), lab(1002);
  SampleParams p{.seed = 5, .epoch = 0, .index = 0, .max_residues = 1022};
  p.masking = {.select_prob = 1.0, .mask_prob = 0.0, .random_prob = 1.0};
  for (int64_t e = 0; e < 100; ++e) {
    p.epoch = e;
    make_sample(data.residues(0), p, tok.data(), lab.data());
    for (int j = 1; j <= 1000; ++j) ++hist[static_cast<size_t>(tok[j])];
  }
  for (int32_t t = kEsmFirstStandardId; t < kEsmFirstStandardId + kEsmNumStandard; ++t)
    EXPECT_NEAR(double(hist[t]) / 100000.0, 0.05, 0.004) << esm_token(t);  // sigma ~ 7e-4
}

TEST(Sample, DynamicMaskingAcrossEpochs) {
  auto data = random_dataset(1, 800, 800);
  std::vector<int32_t> a(802), b(802), la(802), lb(802);
  SampleParams p{.seed = 77, .epoch = 0, .index = 0};
  make_sample(data->residues(0), p, a.data(), la.data());
  make_sample(data->residues(0), p, b.data(), lb.data());
  EXPECT_EQ(la, lb);  // same key, same masks
  EXPECT_EQ(a, b);
  p.epoch = 1;
  make_sample(data->residues(0), p, b.data(), lb.data());
  EXPECT_NE(la, lb);  // next epoch, other masks
  p = {.seed = 78, .epoch = 0, .index = 0};
  make_sample(data->residues(0), p, b.data(), lb.data());
  EXPECT_NE(la, lb);  // other seed, other masks
}

// Checks every packing invariant of one batch against the dataset.
void check_batch(const ProteinDataset& data, const PackedBatch& b, const PackingOptions& opt) {
  const auto cu = ints(b.cu_seqlens), cup = ints(b.cu_seqlens_padded);
  const auto tok = ints(b.tokens), lab = ints(b.labels);
  const size_t nseq = b.indices.size();
  ASSERT_EQ(cu.size(), nseq + 1);
  ASSERT_EQ(cup.size(), nseq + 1);
  EXPECT_EQ(cu[0], 0);
  EXPECT_EQ(cup[0], 0);
  EXPECT_EQ(b.tokens.numel(), cup.back());
  EXPECT_EQ(b.labels.numel(), cup.back());
  EXPECT_LE(cup.back(), opt.tokens_per_batch);
  EXPECT_EQ(b.num_tokens, cu.back());
  int32_t max_s = 0, max_sp = 0;
  int64_t labelled = 0;
  for (size_t i = 0; i < nseq; ++i) {
    const int32_t s = cu[i + 1] - cu[i], sp = cup[i + 1] - cup[i];
    EXPECT_GT(s, 2);
    EXPECT_EQ(s, sample_tokens(data.length(b.indices[i]), opt.max_residues));
    EXPECT_EQ(sp % opt.pad_to_multiple, 0);
    EXPECT_GE(sp, s);
    EXPECT_LT(sp - s, opt.pad_to_multiple);
    max_s = std::max(max_s, s);
    max_sp = std::max(max_sp, sp);
    EXPECT_EQ(tok[cup[i]], kEsmClsId);
    EXPECT_EQ(tok[cup[i] + s - 1], kEsmEosId);
    for (int32_t k = cup[i]; k < cup[i] + s; ++k) {
      if (k > cup[i] && k < cup[i] + s - 1) {
        EXPECT_NE(tok[k], kEsmClsId);
        EXPECT_NE(tok[k], kEsmPadId);
        EXPECT_NE(tok[k], kEsmEosId);
      }
      labelled += lab[k] != kIgnoreLabel;
    }
    for (int32_t k = cup[i] + s; k < cup[i + 1]; ++k) {
      EXPECT_EQ(tok[k], kEsmPadId);
      EXPECT_EQ(lab[k], kIgnoreLabel);
    }
    EXPECT_EQ(lab[cup[i]], kIgnoreLabel);
    EXPECT_EQ(lab[cup[i] + s - 1], kIgnoreLabel);
  }
  EXPECT_EQ(b.max_seqlen, max_s);
  EXPECT_EQ(b.max_seqlen_padded, max_sp);
  EXPECT_EQ(b.num_labels, labelled);
  EXPECT_EQ(b.tokens.dtype(), DType::kI32);
  EXPECT_TRUE(b.tokens.is_cpu());
}

TEST(Packing, InvariantsWithAndWithoutPadding) {
  auto data = random_dataset(600, 1, 1400);
  for (const int32_t multiple : {1, 8, 16}) {
    const PackingOptions opt{
        .tokens_per_batch = 4096, .pad_to_multiple = multiple, .max_residues = 1022};
    const std::vector<int64_t> order = all_indices(*data);
    const auto plan = plan_batches(*data, order, opt);
    ASSERT_GT(plan.size(), 10u);
    int64_t next = 0;
    for (size_t k = 0; k < plan.size(); ++k) {
      EXPECT_EQ(plan[k].begin, next);  // consecutive, every protein once
      EXPECT_GT(plan[k].end, plan[k].begin);
      next = plan[k].end;
      const std::span<const int64_t> ids(order.data() + plan[k].begin,
                                         size_t(plan[k].end - plan[k].begin));
      const PackedBatch b = pack_batch(*data, ids, {.seed = 1, .epoch = 0, .packing = opt});
      check_batch(*data, b, opt);
      // Greedy: the first protein of the next batch did not fit into this one.
      if (k + 1 < plan.size()) {
        const int64_t first_next = order[static_cast<size_t>(plan[k + 1].begin)];
        const int64_t need = padded_tokens(sample_tokens(data->length(first_next), 1022), multiple);
        EXPECT_GT(ints(b.cu_seqlens_padded).back() + need, opt.tokens_per_batch);
      }
    }
    EXPECT_EQ(next, static_cast<int64_t>(order.size()));
  }
}

TEST(Packing, BudgetTooSmallForTheLongestCrop) {
  auto data = random_dataset(10, 900, 1400);
  DataLoaderOptions opt;
  opt.packing = {.tokens_per_batch = 1000, .pad_to_multiple = 1, .max_residues = 1022};
  try {
    DataLoader loader(data, all_indices(*data), opt);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected --tokens-per-batch >= 1024, got 1000"),
              std::string::npos)
        << e.what();
  }
  // The crop makes it fit: 998 residues + cls + eos = 1000 tokens.
  opt.packing.max_residues = 998;
  DataLoader loader(data, all_indices(*data), opt);
  const PackedBatch b = loader.next();
  EXPECT_EQ(b.indices.size(), 1u);
  EXPECT_EQ(b.max_seqlen, 1000);
  // Padding counts against the budget: 1000 padded to 16 is 1008.
  opt.packing.pad_to_multiple = 16;
  EXPECT_THROW(DataLoader(data, all_indices(*data), opt), Error);
  EXPECT_THROW(plan_batches(*data, all_indices(*data), opt.packing), Error);
}

TEST(Loader, ShuffleIsAPermutationPerEpoch) {
  auto data = random_dataset(500, 5, 60);
  DataLoaderOptions opt;
  opt.seed = 42;
  DataLoader loader(data, all_indices(*data), opt);
  const auto o0 = loader.epoch_order(0), o1 = loader.epoch_order(1);
  auto sorted0 = o0;
  std::sort(sorted0.begin(), sorted0.end());
  EXPECT_EQ(sorted0, all_indices(*data));
  EXPECT_NE(o0, o1);
  EXPECT_NE(o0, all_indices(*data));
  EXPECT_EQ(DataLoader(data, all_indices(*data), opt).epoch_order(0), o0);  // seeded
  opt.seed = 43;
  EXPECT_NE(DataLoader(data, all_indices(*data), opt).epoch_order(0), o0);
  opt.shuffle = false;
  EXPECT_EQ(DataLoader(data, all_indices(*data), opt).epoch_order(3), all_indices(*data));
  // Positions are spread: the first protein lands anywhere.
  std::set<int64_t> first;
  for (int64_t e = 0; e < 200; ++e) first.insert(loader.epoch_order(e)[0]);
  EXPECT_GT(first.size(), 150u);
}

TEST(Split, DeterministicByIdAndDisjoint) {
  auto data = random_dataset(20000, 1, 3);
  const SplitOptions opt{.validation_fraction = 0.1, .split_seed = 0};
  const auto train = split_indices(*data, Split::kTrain, opt);
  const auto valid = split_indices(*data, Split::kValidation, opt);
  EXPECT_EQ(train.size() + valid.size(), 20000u);
  EXPECT_NEAR(double(valid.size()) / 20000.0, 0.1, 0.008);
  std::vector<int64_t> both;
  std::set_intersection(train.begin(), train.end(), valid.begin(), valid.end(),
                        std::back_inserter(both));
  EXPECT_TRUE(both.empty());
  // The side depends on the id only: the same ids in another order and file keep their side.
  ProteinDataset reversed;
  for (int64_t i = 19999; i >= 0; --i) reversed.add("prot" + std::to_string(i), "MKT");
  const auto valid_rev = split_indices(reversed, Split::kValidation, opt);
  std::vector<int64_t> mapped;
  for (const int64_t j : valid_rev) mapped.push_back(19999 - j);
  std::sort(mapped.begin(), mapped.end());
  EXPECT_EQ(mapped, valid);
  // Another split seed holds out other proteins; fraction 0 holds out none.
  EXPECT_NE(split_indices(*data, Split::kValidation, {.validation_fraction = 0.1, .split_seed = 1}),
            valid);
  EXPECT_TRUE(split_indices(*data, Split::kValidation, {}).empty());
  EXPECT_THROW(split_indices(*data, Split::kTrain, {.validation_fraction = 1.0}), Error);
}

TEST(Loader, SameSeedAndCursorGiveIdenticalBatches) {
  auto data = random_dataset(400, 20, 700);
  DataLoaderOptions opt;
  opt.seed = 7;
  opt.packing = {.tokens_per_batch = 2048, .pad_to_multiple = 8, .max_residues = 1022};
  DataLoader a(data, all_indices(*data), opt), b(data, all_indices(*data), opt);
  for (int k = 0; k < 30; ++k) {
    const PackedBatch x = a.next(), y = b.next();
    expect_same_batch(x, y);
    check_batch(*data, x, opt.packing);
  }
  EXPECT_EQ(a.cursor(), b.cursor());
  opt.seed = 8;
  DataLoader c(data, all_indices(*data), opt);
  DataLoader a2(data, all_indices(*data), {.seed = 7, .packing = opt.packing});
  EXPECT_NE(ints(c.next().tokens), ints(a2.next().tokens));
}

TEST(Loader, RanksAreDisjointAndCoverTheEpoch) {
  auto data = random_dataset(700, 20, 900);
  const int world = 4;
  DataLoaderOptions base;
  base.seed = 19;
  base.packing = {.tokens_per_batch = 3000, .pad_to_multiple = 1, .max_residues = 1022};
  base.world_size = world;
  std::vector<std::unique_ptr<DataLoader>> ranks;
  for (int r = 0; r < world; ++r) {
    DataLoaderOptions o = base;
    o.rank = r;
    ranks.push_back(std::make_unique<DataLoader>(data, all_indices(*data), o));
  }
  const int64_t nb = ranks[0]->num_batches(0);
  const int64_t per_rank = ranks[0]->batches_per_rank(0);
  ASSERT_EQ(per_rank, nb / world);
  ASSERT_GT(per_rank, 5);
  std::map<int64_t, int> seen_batch;
  std::map<int64_t, int> seen_protein;
  for (int64_t step = 0; step < per_rank; ++step) {
    for (int r = 0; r < world; ++r) {
      const PackedBatch b = ranks[static_cast<size_t>(r)]->next();
      EXPECT_EQ(b.epoch, 0);
      EXPECT_EQ(b.global_index, step * world + r);  // rank r gets batches i with i % world == r
      ++seen_batch[b.global_index];
      for (const int64_t i : b.indices) ++seen_protein[i];
      expect_same_batch(b, ranks[0]->batch(0, b.global_index));  // any rank can rebuild it
    }
  }
  EXPECT_EQ(static_cast<int64_t>(seen_batch.size()), per_rank * world);
  for (const auto& [g, n] : seen_batch) EXPECT_EQ(n, 1) << "batch " << g;
  for (const auto& [i, n] : seen_protein) EXPECT_EQ(n, 1) << "protein " << i;
  // Together with the dropped tail (fewer than `world` batches) the ranks cover every protein.
  int64_t tail = 0;
  for (int64_t g = per_rank * world; g < nb; ++g) tail += ranks[0]->batch(0, g).indices.size();
  EXPECT_LT(nb - per_rank * world, world);
  EXPECT_EQ(static_cast<int64_t>(seen_protein.size()) + tail, data->size());
  // All ranks hold the same cursor and move to epoch 1 together.
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(ranks[static_cast<size_t>(r)]->cursor(), (DataCursor{0, per_rank * world}));
    EXPECT_EQ(ranks[static_cast<size_t>(r)]->next().epoch, 1);
  }
}

TEST(Loader, ResumeFromCursorReproducesTheBatches) {
  auto data = random_dataset(120, 20, 500);
  DataLoaderOptions opt;
  opt.seed = 2024;
  opt.packing = {.tokens_per_batch = 2048, .pad_to_multiple = 4, .max_residues = 300};
  opt.world_size = 2;
  opt.rank = 1;
  DataLoader run(data, all_indices(*data), opt);
  const int64_t per_epoch = run.batches_per_rank(0);
  ASSERT_GT(per_epoch, 3);
  // Run across several epoch boundaries; save the cursor at every step.
  std::vector<DataCursor> saved;
  std::vector<PackedBatch> batches;
  for (int k = 0; k < 4 * per_epoch; ++k) {
    saved.push_back(run.cursor());
    batches.push_back(run.next());
  }
  EXPECT_GE(batches.back().epoch, 2);
  for (const size_t from :
       {size_t{0}, size_t{3}, static_cast<size_t>(per_epoch), batches.size() - 2}) {
    DataLoader resumed(data, all_indices(*data), opt);  // a fresh process after a restart
    resumed.set_cursor(saved[from]);
    for (size_t k = from; k < batches.size(); ++k) expect_same_batch(resumed.next(), batches[k]);
    EXPECT_EQ(resumed.cursor(), run.cursor());
  }
  EXPECT_THROW(run.set_cursor({-1, 0}), Error);
}

TEST(Loader, TooFewBatchesForTheRanks) {
  auto data = random_dataset(3, 10, 20);
  DataLoaderOptions opt;
  opt.world_size = 4;
  opt.rank = 3;
  DataLoader loader(data, all_indices(*data), opt);  // one batch of 3 proteins, four ranks
  try {
    loader.next();
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("epoch 0 has 1 batches"), std::string::npos) << e.what();
  }
}

TEST(BundledData, SwissProt3k) {
  const std::string path = std::string(HELIX_SOURCE_DIR) + "/examples/data/swissprot_3k.fasta.gz";
  const auto data = std::make_shared<ProteinDataset>(ProteinDataset::from_fasta(path));
  EXPECT_EQ(data->size(), 3000);
  EXPECT_EQ(data->fasta_stats().skipped_total(), 0);
  EXPECT_EQ(data->total_residues(), 1125081);
  EXPECT_EQ(data->id_hash(0), hash_record_id("B0RED7"));  // record 0 of the database
  const auto first = data->residues(0).subspan(0, 10);
  EXPECT_EQ(esm_decode(std::vector<int32_t>(first.begin(), first.end())), "MGSASRASLD");
  const auto train = split_indices(*data, Split::kTrain, {.validation_fraction = 0.05});
  const auto valid = split_indices(*data, Split::kValidation, {.validation_fraction = 0.05});
  EXPECT_NEAR(double(valid.size()) / 3000.0, 0.05, 0.015);
  DataLoader loader(data, train, {.seed = 1, .packing = {.tokens_per_batch = 16384}});
  for (int k = 0; k < 5; ++k) check_batch(*data, loader.next(), loader.options().packing);
}

}  // namespace
}  // namespace helix
