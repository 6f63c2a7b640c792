// make_rank_groups: the worked example of its header, invariants on many shapes, every error.
// Single process, no MPI.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "core/error.h"
#include "parallel/rank_groups.h"

namespace helix {
namespace {

using Groups = std::vector<std::vector<int>>;

TEST(RankGroups, WorkedExampleOfTheHeader) {
  const RankGroups g = make_rank_groups(16, {.tp = 2, .cp = 2, .pp = 2});
  EXPECT_EQ(g.sizes().dp, 2);
  EXPECT_EQ(g.groups(GroupKind::kTP),
            (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(g.groups(GroupKind::kCP),
            (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(g.groups(GroupKind::kDP),
            (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}}));
  EXPECT_EQ(g.groups(GroupKind::kPP),
            (Groups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
  EXPECT_EQ(g.groups(GroupKind::kDpCp),
            (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}}));
  EXPECT_EQ(g.groups(GroupKind::kAmax),
            (Groups{{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}}));
  EXPECT_EQ(g.groups(GroupKind::kWorld),
            (Groups{{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}}));
  // The coordinate table of the comment, spot-checked.
  EXPECT_EQ(g.coords(6), (RankCoords{.tp = 0, .cp = 1, .dp = 1, .pp = 0}));
  EXPECT_EQ(g.coords(13), (RankCoords{.tp = 1, .cp = 0, .dp = 1, .pp = 1}));
  EXPECT_EQ(g.group_index(GroupKind::kCP, 9), 5);
  EXPECT_EQ(g.rank_in_group(GroupKind::kDpCp, 14), 3);
  EXPECT_EQ(g.rank_in_group(GroupKind::kAmax, 13), 5);
}

// The invariants every shape must satisfy.
void check_shape(int world, ParallelSizes sizes) {
  SCOPED_TRACE(::testing::Message() << "world " << world << " tp " << sizes.tp << " cp " << sizes.cp
                                    << " pp " << sizes.pp);
  const RankGroups g = make_rank_groups(world, sizes);
  const ParallelSizes s = g.sizes();
  ASSERT_EQ(int64_t{s.tp} * s.cp * s.dp * s.pp, world);
  for (int r = 0; r < world; ++r) ASSERT_EQ(g.rank_of(g.coords(r)), r);
  // TP is fastest: a TP group is a run of consecutive ranks.
  for (const auto& grp : g.groups(GroupKind::kTP))
    for (size_t i = 1; i < grp.size(); ++i) EXPECT_EQ(grp[i], grp[0] + static_cast<int>(i));

  auto coord = [](const RankCoords& c, int d) {
    return d == 0 ? c.tp : d == 1 ? c.cp : d == 2 ? c.dp : c.pp;
  };
  struct KindDims {
    GroupKind kind;
    std::array<bool, 4> varies;  // tp, cp, dp, pp
  };
  const KindDims kinds[] = {
      {GroupKind::kTP, {true, false, false, false}},  {GroupKind::kCP, {false, true, false, false}},
      {GroupKind::kDP, {false, false, true, false}},  {GroupKind::kPP, {false, false, false, true}},
      {GroupKind::kDpCp, {false, true, true, false}}, {GroupKind::kAmax, {true, true, true, false}},
      {GroupKind::kWorld, {true, true, true, true}}};
  const int dims[4] = {s.tp, s.cp, s.dp, s.pp};
  for (const KindDims& k : kinds) {
    SCOPED_TRACE(std::string(group_kind_name(k.kind)));
    int size = 1;
    for (int d = 0; d < 4; ++d)
      if (k.varies[d]) size *= dims[d];
    const auto& groups = g.groups(k.kind);
    ASSERT_EQ(static_cast<int>(groups.size()), world / size);
    std::set<int> seen;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const auto& grp = groups[gi];
      ASSERT_EQ(static_cast<int>(grp.size()), size);
      EXPECT_TRUE(std::is_sorted(grp.begin(), grp.end()));
      if (gi > 0) EXPECT_LT(groups[gi - 1][0], grp[0]);  // ordered by first rank
      for (size_t i = 0; i < grp.size(); ++i) {
        EXPECT_TRUE(seen.insert(grp[i]).second) << "rank " << grp[i] << " in two groups";
        EXPECT_EQ(g.group_index(k.kind, grp[i]), static_cast<int>(gi));
        EXPECT_EQ(g.rank_in_group(k.kind, grp[i]), static_cast<int>(i));
        const RankCoords a = g.coords(grp[0]), b = g.coords(grp[i]);
        for (int d = 0; d < 4; ++d)
          if (!k.varies[d]) EXPECT_EQ(coord(a, d), coord(b, d)) << "fixed dim " << d << " differs";
      }
    }
    EXPECT_EQ(static_cast<int>(seen.size()), world);  // a partition of the world
  }
  // Single-dimension groups list the coordinate in order: position i has coordinate i.
  for (int r = 0; r < world; ++r) {
    const RankCoords c = g.coords(r);
    EXPECT_EQ(g.rank_in_group(GroupKind::kTP, r), c.tp);
    EXPECT_EQ(g.rank_in_group(GroupKind::kCP, r), c.cp);
    EXPECT_EQ(g.rank_in_group(GroupKind::kDP, r), c.dp);
    EXPECT_EQ(g.rank_in_group(GroupKind::kPP, r), c.pp);
    EXPECT_EQ(g.rank_in_group(GroupKind::kDpCp, r), c.cp + s.cp * c.dp);
  }
}

TEST(RankGroups, InvariantsOnManyShapes) {
  check_shape(1, {});
  check_shape(2, {.tp = 2});
  check_shape(2, {});  // dp = 2
  check_shape(4, {.tp = 2});
  check_shape(4, {.cp = 2});
  check_shape(8, {.tp = 2, .cp = 2, .pp = 2});
  check_shape(12, {.tp = 3, .cp = 2});
  check_shape(24, {.tp = 2, .cp = 3, .pp = 2});
  check_shape(6, {.pp = 3});
  check_shape(7, {});
  check_shape(1024, {.tp = 8, .cp = 2, .pp = 16});
}

TEST(RankGroups, DpGivenAndDerived) {
  EXPECT_EQ(make_rank_groups(8, {.tp = 2}).sizes().dp, 4);
  EXPECT_EQ(make_rank_groups(8, {.tp = 2, .dp = 4}).sizes().dp, 4);
  EXPECT_EQ(make_rank_groups(12, {.tp = 2, .pp = 3}).sizes().dp, 2);
}

// The message of the error make_rank_groups throws ("" when it does not throw).
std::string error_of(int world, ParallelSizes sizes) {
  try {
    make_rank_groups(world, sizes);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_error(int world, ParallelSizes sizes, const std::string& needle) {
  const std::string msg = error_of(world, sizes);
  EXPECT_NE(msg.find(needle), std::string::npos)
      << "expected an error containing '" << needle << "', got '" << msg << "'";
}

TEST(RankGroups, EveryErrorNamesTheFlagAndRule) {
  expect_error(0, {}, "world size: expected at least 1 rank, got 0");
  expect_error(4, {.tp = 0}, "--tp: expected a size >= 1, got 0");
  expect_error(4, {.cp = -1}, "--cp: expected a size >= 1, got -1");
  expect_error(4, {.pp = 0}, "--pp: expected a size >= 1, got 0");
  expect_error(4, {.dp = -2}, "--dp: expected a size >= 1 (or 0 to derive it), got -2");
  expect_error(6, {.tp = 4},
               "--tp 4 x --cp 1 x --pp 1 = 4 must divide the world size, got 6 ranks");
  expect_error(8, {.tp = 2, .cp = 3},
               "--tp 2 x --cp 3 x --pp 1 = 6 must divide the world size, got 8");
  expect_error(4, {.tp = 8}, "= 8 must divide the world size, got 4 ranks");
  expect_error(8, {.tp = 2, .dp = 3}, "--dp 3: expected world / (tp*cp*pp) = 8 / 2 = 4, got 3");
  EXPECT_EQ(error_of(8, {.tp = 2, .dp = 4}), "");
}

TEST(RankGroups, CoordinateQueriesCheckTheirArguments) {
  const RankGroups g = make_rank_groups(4, {.tp = 2});
  EXPECT_THROW(g.coords(4), Error);
  EXPECT_THROW(g.coords(-1), Error);
  EXPECT_THROW(g.rank_of({.tp = 2}), Error);
  EXPECT_THROW(g.group_index(GroupKind::kTP, 9), Error);
}

}  // namespace
}  // namespace helix
