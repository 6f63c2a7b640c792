#pragma once
// Rank groups as a pure function of the world size and the parallel sizes (no MPI, no state), so
// the layout is unit-tested on one process. Rank order is tp-cp-dp-pp, TP fastest: the ranks of a
// TP group are consecutive and stay inside a node. Every kind of group partitions the world.
#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

namespace helix {

// The parallel sizes a user asks for (--tp, --cp, --pp, --dp). dp = 0 means "derived": world /
// (tp*cp*pp).
struct ParallelSizes {
  int tp = 1;
  int cp = 1;
  int pp = 1;
  int dp = 0;
};

// The kinds of groups a rank belongs to. kDpCp (data x context) is the group gradients are averaged
// over when cp > 1: CP ranks hold different tokens of the same sequences, so their gradients are
// partial sums too. kAmax (tp x cp x dp, everything but pp) is the FP8 amax-reduction group.
enum class GroupKind : uint8_t { kTP, kCP, kDP, kPP, kDpCp, kAmax, kWorld };
inline constexpr int kNumGroupKinds = 7;
inline constexpr std::array<GroupKind, kNumGroupKinds> kAllGroupKinds = {
    GroupKind::kTP,   GroupKind::kCP,   GroupKind::kDP,   GroupKind::kPP,
    GroupKind::kDpCp, GroupKind::kAmax, GroupKind::kWorld};
std::string_view group_kind_name(
    GroupKind kind);  // "tp", "cp", "dp", "pp", "dp_cp", "amax", "world"

// Where a rank sits: rank = tp + TP * (cp + CP * (dp + DP * pp)).
struct RankCoords {
  int tp = 0;
  int cp = 0;
  int dp = 0;
  int pp = 0;
  bool operator==(const RankCoords&) const = default;
};

class RankGroups {
 public:
  int world() const { return world_; }
  // The sizes with dp filled in.
  const ParallelSizes& sizes() const { return sizes_; }
  // Every group of a kind, ordered by their first rank; members in ascending rank order, which is
  // also the order of the member's coordinate along the group (position in group = group rank).
  const std::vector<std::vector<int>>& groups(GroupKind kind) const {
    return groups_[static_cast<size_t>(kind)];
  }
  // The index (into groups(kind)) of the group holding `rank`, and rank's position in it.
  int group_index(GroupKind kind, int rank) const;
  int rank_in_group(GroupKind kind, int rank) const;
  const std::vector<int>& group_of(GroupKind kind, int rank) const {
    return groups(kind)[static_cast<size_t>(group_index(kind, rank))];
  }
  RankCoords coords(int rank) const;
  int rank_of(const RankCoords& c) const;

 private:
  friend RankGroups make_rank_groups(int world, ParallelSizes sizes);
  int world_ = 0;
  ParallelSizes sizes_;
  std::array<std::vector<std::vector<int>>, kNumGroupKinds> groups_;
  std::array<std::vector<int>, kNumGroupKinds> index_of_rank_;  // [kind][rank] -> group index
};

// Builds every group of every kind. Throws helix::Error naming the flag and the rule when the sizes
// do not fit the world (a size < 1, world not divisible by tp*cp*pp, a given --dp that does not
// match).
//
// Worked example: world = 16, tp = 2, cp = 2, pp = 2, so dp = 16 / (2*2*2) = 2 and
// rank = tp + 2*(cp + 2*(dp + 2*pp)):
//   rank:   0 1 2 3 4 5 6 7 | 8 9 10 11 12 13 14 15
//   tp:     0 1 0 1 0 1 0 1 | 0 1  0  1  0  1  0  1
//   cp:     0 0 1 1 0 0 1 1 | 0 0  1  1  0  0  1  1
//   dp:     0 0 0 0 1 1 1 1 | 0 0  0  0  1  1  1  1
//   pp:     0 0 0 0 0 0 0 0 | 1 1  1  1  1  1  1  1
//   tp    groups: [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
//   cp    groups: [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
//   dp    groups: [0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]
//   pp    groups: [0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]
//   dp_cp groups: [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
//   amax  groups: [0..7] [8..15]          (one per pipeline stage)
//   world group:  [0..15]
RankGroups make_rank_groups(int world, ParallelSizes sizes);

}  // namespace helix
