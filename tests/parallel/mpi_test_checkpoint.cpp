// Checkpoints across layouts, below the CLI: a model split tp = world ways saves; the tensors
// assembled from the index equal the gathered masters (so the per-rank pieces describe the TP shard
// layouts, vocabulary pad rows included); a tp = 1 model loads it bitwise, saves, and a fresh tp =
// world model loads that back bitwise (masters and AdamW moments). Extra state: replicated state
// reshards, per-rank state round-trips on its layout and is refused on another.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "launch/checkpoint.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "mpi_test_util.h"

namespace helix {
namespace {

ModelConfig ckpt_config() {
  ModelConfig c;
  c.name = "ckpt-tiny";
  c.layers = 1;
  c.hidden = 32;
  c.heads = 4;
  c.ffn = 64;
  return c;
}

// A directory every rank sees (rank 0 creates it).
std::string shared_tmpdir() {
  char buf[256] = {0};
  if (testing::world_rank() == 0) {
    std::strcpy(buf, "/tmp/helix_ckpt_mpi_XXXXXX");
    if (!mkdtemp(buf)) buf[0] = 0;
  }
  MPI_Bcast(buf, sizeof(buf), MPI_CHAR, 0, MPI_COMM_WORLD);
  return buf;
}

void cleanup(const std::string& dir) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (testing::world_rank() == 0) std::filesystem::remove_all(dir);
}

// Deterministic moment values from the full master (so any layout knows what to expect).
Tensor moment_of(const Tensor& full, float a, float b) {
  Tensor m = full.clone();
  float* d = m.data<float>();
  for (int64_t i = 0; i < m.numel(); ++i) d[i] = a * d[i] * d[i] + b * static_cast<float>(i % 7);
  return m;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to(Device::cpu()), y = b.to(Device::cpu());
  return x.shape() == y.shape() && x.dtype() == y.dtype() &&
         std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

Esm2Options cpu_options(const ParallelContext* ctx) {
  Esm2Options o;
  o.device = Device::cpu();
  o.parallel = ctx;
  return o;
}

TEST(Checkpoint, ReshardsTensorParallelToOneRankAndBackBitwise) {
  const int world = testing::world_size();
  const std::string dir = shared_tmpdir();
  ASSERT_FALSE(dir.empty());
  const ParallelContext split = testing::make_context({.tp = world});
  Esm2Model a(ckpt_config(), cpu_options(&split));
  a.init_random(11);
  AdamW opt_a(a.params(), AdamWConfig{});
  opt_a.set_steps_applied(5);
  std::vector<Tensor> full_master, full_m1, full_m2;
  for (size_t i = 0; i < a.params().all().size(); ++i) {
    const Parameter& p = a.params().all()[i];
    full_master.push_back(a.full_master(p));  // collective over tp
    full_m1.push_back(moment_of(full_master.back(), 0.5f, 0.25f));
    full_m2.push_back(moment_of(full_master.back(), 2.0f, 0.0f));
    opt_a.moments()[i].first.copy_from(a.shard_of(p, full_m1.back()));
    opt_a.moments()[i].second.copy_from(a.shard_of(p, full_m2.back()));
  }
  const std::string saved =
      Checkpointer(CheckpointerParams{.ctx = &split, .model = &a, .optimizer = &opt_a})
          .save(dir + "/split", 3, 1);

  // The index assembles into the gathered full tensors.
  const Json meta = read_checkpoint_meta(saved);
  CheckpointReader reader(saved, tensor_index_from_json(meta.at("tensors"), "test"));
  bool ok = true;
  for (size_t i = 0; i < a.params().all().size(); ++i) {
    const std::string& n = a.params().all()[i].name;
    ok = ok && bitwise_equal(reader.assemble("model/" + n), full_master[i]);
    ok = ok && bitwise_equal(reader.assemble("optim/exp_avg/" + n), full_m1[i]);
    ok = ok && bitwise_equal(reader.assemble("optim/exp_avg_sq/" + n), full_m2[i]);
  }
  EXPECT_TRUE(testing::all_ranks(ok))
      << "assembled tensors differ from the gathered masters / moments";
  EXPECT_EQ(meta.at("layout").at("tp").as_int(), world);
  EXPECT_EQ(meta.at("files").as_object().size(), static_cast<size_t>(world));

  // One rank's model (every rank a dp replica) loads it: whole tensors, bitwise.
  const ParallelContext whole = testing::make_context({.tp = 1});
  Esm2Model b(ckpt_config(), cpu_options(&whole));
  b.init_random(99);
  AdamW opt_b(b.params(), AdamWConfig{});
  const TrainProgress pr =
      Checkpointer(CheckpointerParams{.ctx = &whole, .model = &b, .optimizer = &opt_b})
          .load(dir + "/split", "--resume");
  EXPECT_EQ(pr.step, 3);
  EXPECT_EQ(pr.skipped, 1);
  EXPECT_EQ(opt_b.steps_applied(), 5);
  ok = true;
  for (size_t i = 0; i < b.params().all().size(); ++i) {
    ok = ok && bitwise_equal(b.params().all()[i].master, full_master[i]);
    ok = ok && bitwise_equal(opt_b.moments()[i].first, full_m1[i]);
    ok = ok && bitwise_equal(opt_b.moments()[i].second, full_m2[i]);
  }
  EXPECT_TRUE(testing::all_ranks(ok)) << "tp " << world << " -> 1 is not bitwise";

  // And back onto tp = world.
  Checkpointer(CheckpointerParams{.ctx = &whole, .model = &b, .optimizer = &opt_b})
      .save(dir + "/whole", 3, 1);
  Esm2Model c(ckpt_config(), cpu_options(&split));
  c.init_random(7);
  AdamW opt_c(c.params(), AdamWConfig{});
  Checkpointer(CheckpointerParams{.ctx = &split, .model = &c, .optimizer = &opt_c})
      .load(dir + "/whole", "--resume");
  ok = true;
  for (size_t i = 0; i < c.params().all().size(); ++i) {
    const Parameter& p = c.params().all()[i];
    ok = ok && bitwise_equal(p.master, a.params().all()[i].master);
    ok = ok && bitwise_equal(opt_c.moments()[i].first, opt_a.moments()[i].first);
    ok = ok && bitwise_equal(opt_c.moments()[i].second, opt_a.moments()[i].second);
  }
  EXPECT_TRUE(testing::all_ranks(ok)) << "1 -> tp " << world << " is not bitwise";
  cleanup(dir);
}

TEST(Checkpoint, ExtraStateReplicatedReshardsPerRankOnlyOnItsLayout) {
  const int world = testing::world_size(), rank = testing::world_rank();
  const std::string dir = shared_tmpdir();
  ASSERT_FALSE(dir.empty());
  const ParallelContext split = testing::make_context({.tp = world});
  Esm2Model a(ckpt_config(), cpu_options(&split));
  a.init_random(1);
  AdamW opt_a(a.params(), AdamWConfig{});
  Tensor shared = Tensor::from_vector<float>({1.5f, -2.0f, 3.25f}, Shape{3});
  Tensor mine = Tensor::from_vector<float>({float(rank), float(rank * 10)}, Shape{2});
  {
    Checkpointer ck(CheckpointerParams{.ctx = &split, .model = &a, .optimizer = &opt_a});
    ck.add_state({.name = "test/shared", .tensor = shared, .reshard = Reshard::kAny});
    ck.add_state({.name = "test/mine", .tensor = mine, .reshard = Reshard::kSameLayout});
    ck.save(dir, 2, 0);
  }
  // Same layout: both come back.
  Tensor shared2 = Tensor::zeros({3}, DType::kF32), mine2 = Tensor::zeros({2}, DType::kF32);
  {
    Checkpointer ck(CheckpointerParams{.ctx = &split, .model = &a, .optimizer = &opt_a});
    ck.add_state({.name = "test/shared", .tensor = shared2, .reshard = Reshard::kAny});
    ck.add_state({.name = "test/mine", .tensor = mine2, .reshard = Reshard::kSameLayout});
    ck.load(dir, "--resume");
  }
  EXPECT_TRUE(testing::all_ranks(bitwise_equal(shared2, shared) && bitwise_equal(mine2, mine)));
  // Another layout: the per-rank state cannot be resharded; refused on every rank, naming it.
  const ParallelContext whole = testing::make_context({.tp = 1});
  Esm2Model b(ckpt_config(), cpu_options(&whole));
  AdamW opt_b(b.params(), AdamWConfig{});
  std::string message;
  try {
    Checkpointer(CheckpointerParams{.ctx = &whole, .model = &b, .optimizer = &opt_b})
        .load(dir, "--resume");
  } catch (const Error& e) {
    message = e.what();
  }
  const bool refused =
      message.find("state 'extra/test/mine@rank0' is per-rank") != std::string::npos &&
      message.find("cannot be resharded") != std::string::npos;
  EXPECT_TRUE(testing::all_ranks(refused)) << message;
  cleanup(dir);
}

}  // namespace
}  // namespace helix
