// ParallelContext: coordinates and communicators match make_rank_groups for every kind, kinds with
// the same partition share one communicator, every communicator is wired to its group (an
// all-reduce of world ranks gives the group's sum), bad sizes throw alike on every rank. Watchdog
// bookkeeping and HELIX_COMM_TIMEOUT_S parsing (the abort itself is tested by the parallel.abort.*
// ctest cases).
#include <chrono>
#include <cstdlib>
#include <numeric>
#include <thread>

#include "mpi_test_util.h"

namespace helix {
namespace {

using testing::world_rank;
using testing::world_size;

void check_context(ParallelSizes sizes) {
  SCOPED_TRACE(::testing::Message()
               << "tp " << sizes.tp << " cp " << sizes.cp << " pp " << sizes.pp);
  ParallelContext ctx = testing::make_context(sizes);
  const RankGroups want = make_rank_groups(world_size(), sizes);
  const int me = world_rank();
  EXPECT_EQ(ctx.world_rank(), me);
  EXPECT_EQ(ctx.world_size(), world_size());
  EXPECT_EQ(ctx.coords(), want.coords(me));
  EXPECT_EQ(ctx.sizes().dp, want.sizes().dp);
  for (GroupKind kind : kAllGroupKinds) {
    SCOPED_TRACE(std::string(group_kind_name(kind)));
    Communicator& c = ctx.comm(kind);
    EXPECT_EQ(c.group().ranks, want.group_of(kind, me));
    EXPECT_EQ(c.rank(), want.rank_in_group(kind, me));
    EXPECT_EQ(c.size(), static_cast<int>(want.group_of(kind, me).size()));
    EXPECT_NE(c.group().name.find(group_kind_name(kind)), std::string::npos) << c.group().name;
    // Wired to the right processes: the sum of the members' world ranks.
    Tensor t = Tensor::from_vector<int32_t>({me, 1}, {2});
    c.all_reduce(t, ReduceOp::kSum, Stream());
    const auto& g = want.group_of(kind, me);
    EXPECT_EQ(t.to_vector<int32_t>(), (std::vector<int32_t>{std::accumulate(g.begin(), g.end(), 0),
                                                            static_cast<int32_t>(g.size())}));
  }
}

TEST(ParallelContext, GroupsMatchMakeRankGroups) {
  const int w = world_size();
  check_context({});
  check_context({.tp = w});
  check_context({.cp = w});
  check_context({.pp = w});
  if (w % 2 == 0) {
    check_context({.tp = 2});
    check_context({.cp = 2});
    check_context({.pp = 2});
  }
  if (w == 4) {
    check_context({.tp = 2, .cp = 2});
    check_context({.tp = 2, .pp = 2});
    check_context({.cp = 2, .pp = 2});
  }
}

TEST(ParallelContext, KindsWithOnePartitionShareACommunicator) {
  ParallelContext ctx = testing::make_context({.tp = world_size()});
  EXPECT_EQ(&ctx.tp(), &ctx.world());
  EXPECT_EQ(&ctx.amax(), &ctx.world());
  EXPECT_EQ(&ctx.cp(), &ctx.dp());  // all groups of one rank
  EXPECT_EQ(ctx.world().group().name, "tp/amax/world");
  EXPECT_EQ(ctx.cp().group().name, "cp/dp/pp/dp_cp");
  EXPECT_NE(&ctx.tp(), &ctx.dp());
}

TEST(ParallelContext, SizesThatDoNotFitThrowOnEveryRank) {
  const int w = world_size();
  try {
    testing::make_context({.tp = w + 1});
    ADD_FAILURE() << "tp larger than the world was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("--tp {} x --cp 1 x --pp 1", w + 1)),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(testing::make_context({.tp = 1, .dp = w + 1}), Error);
#if !HELIX_WITH_NCCL
  EXPECT_THROW(testing::make_context({}, CommBackend::kNccl, Device::cuda(0)), Error);
#endif
  EXPECT_THROW(testing::make_context({}, CommBackend::kNccl, Device::cpu()), Error);
  // Nothing was left half-made: a good context still works afterwards.
  ParallelContext ctx = testing::make_context({});
  ctx.world().barrier();
}

TEST(Watchdog, TracksHostAndDeviceOperations) {
  Watchdog dog({.timeout_s = 30, .poll_s = 0.01, .world_rank = world_rank()});
  EXPECT_TRUE(dog.enabled());
  const uint64_t id = dog.begin("host op");
  EXPECT_EQ(dog.num_pending(), 1u);
  dog.end(id);
  EXPECT_EQ(dog.num_pending(), 0u);
  {
    WatchScope scope(&dog, "scoped op");
    EXPECT_EQ(dog.num_pending(), 1u);
  }
  EXPECT_EQ(dog.num_pending(), 0u);
  // A device op is dropped once its `done` says so (polled from the watchdog thread).
  auto flag = std::make_shared<std::atomic<bool>>(false);
  dog.track("device op", [flag] { return flag->load(); });
  EXPECT_EQ(dog.num_pending(), 1u);
  flag->store(true);
  for (int i = 0; i < 500 && dog.num_pending() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_EQ(dog.num_pending(), 0u);
  // Resources are polled: a healthy one says nothing.
  auto polls = std::make_shared<std::atomic<int>>(0);
  const uint64_t res = dog.add_resource(
      [polls] {
        ++*polls;
        return std::string();
      },
      [] {});
  for (int i = 0; i < 500 && polls->load() < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_GE(polls->load(), 3);
  dog.remove_resource(res);
}

TEST(Watchdog, ZeroTimeoutDisablesIt) {
  Watchdog dog({.timeout_s = 0});
  EXPECT_FALSE(dog.enabled());
  WatchScope scope(&dog, "not watched");
  EXPECT_EQ(dog.num_pending(), 0u);
  EXPECT_THROW(Watchdog({.timeout_s = -1}), Error);
}

TEST(Watchdog, TimeoutFromTheEnvironment) {
  const char* old = std::getenv("HELIX_COMM_TIMEOUT_S");
  const std::string saved = old ? old : "";
  setenv("HELIX_COMM_TIMEOUT_S", "2.5", 1);
  EXPECT_EQ(comm_timeout_from_env(), 2.5);
  setenv("HELIX_COMM_TIMEOUT_S", "0", 1);
  EXPECT_EQ(comm_timeout_from_env(), 0.0);
  for (const char* bad : {"abc", "-3", "5s", "nan"}) {
    setenv("HELIX_COMM_TIMEOUT_S", bad, 1);
    try {
      comm_timeout_from_env();
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(
          std::string(e.what()).find("HELIX_COMM_TIMEOUT_S: expected a number of seconds >= 0"),
          std::string::npos);
    }
  }
  unsetenv("HELIX_COMM_TIMEOUT_S");
  EXPECT_EQ(comm_timeout_from_env(), 600.0);
  EXPECT_EQ(comm_timeout_from_env(7), 7.0);
  if (old) setenv("HELIX_COMM_TIMEOUT_S", saved.c_str(), 1);
}

}  // namespace
}  // namespace helix
