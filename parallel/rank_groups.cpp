#include "parallel/rank_groups.h"

#include <map>

#include "core/error.h"

namespace helix {
namespace {

// Which coordinates vary inside a group of each kind (the others are fixed and name the group).
struct VaryingDims {
  bool tp, cp, dp, pp;
};
constexpr VaryingDims varying(GroupKind kind) {
  switch (kind) {
    case GroupKind::kTP:
      return {true, false, false, false};
    case GroupKind::kCP:
      return {false, true, false, false};
    case GroupKind::kDP:
      return {false, false, true, false};
    case GroupKind::kPP:
      return {false, false, false, true};
    case GroupKind::kDpCp:
      return {false, true, true, false};
    case GroupKind::kAmax:
      return {true, true, true, false};
    case GroupKind::kWorld:
      return {true, true, true, true};
  }
  return {false, false, false, false};
}

}  // namespace

std::string_view group_kind_name(GroupKind kind) {
  switch (kind) {
    case GroupKind::kTP:
      return "tp";
    case GroupKind::kCP:
      return "cp";
    case GroupKind::kDP:
      return "dp";
    case GroupKind::kPP:
      return "pp";
    case GroupKind::kDpCp:
      return "dp_cp";
    case GroupKind::kAmax:
      return "amax";
    case GroupKind::kWorld:
      return "world";
  }
  return "?";
}

RankCoords RankGroups::coords(int rank) const {
  HELIX_CHECK(rank >= 0 && rank < world_, "rank: expected 0 <= rank < {}, got {}", world_, rank);
  RankCoords c;
  c.tp = rank % sizes_.tp;
  rank /= sizes_.tp;
  c.cp = rank % sizes_.cp;
  rank /= sizes_.cp;
  c.dp = rank % sizes_.dp;
  c.pp = rank / sizes_.dp;
  return c;
}

int RankGroups::rank_of(const RankCoords& c) const {
  HELIX_CHECK(c.tp >= 0 && c.tp < sizes_.tp && c.cp >= 0 && c.cp < sizes_.cp && c.dp >= 0 &&
                  c.dp < sizes_.dp && c.pp >= 0 && c.pp < sizes_.pp,
              "coordinates (tp {}, cp {}, dp {}, pp {}) outside sizes (tp {}, cp {}, dp {}, pp {})",
              c.tp, c.cp, c.dp, c.pp, sizes_.tp, sizes_.cp, sizes_.dp, sizes_.pp);
  return c.tp + sizes_.tp * (c.cp + sizes_.cp * (c.dp + sizes_.dp * c.pp));
}

int RankGroups::group_index(GroupKind kind, int rank) const {
  HELIX_CHECK(rank >= 0 && rank < world_, "rank: expected 0 <= rank < {}, got {}", world_, rank);
  return index_of_rank_[static_cast<size_t>(kind)][static_cast<size_t>(rank)];
}

int RankGroups::rank_in_group(GroupKind kind, int rank) const {
  const std::vector<int>& g = group_of(kind, rank);
  for (size_t i = 0; i < g.size(); ++i)
    if (g[i] == rank) return static_cast<int>(i);
  HELIX_FAIL("rank {} missing from its own {} group", rank, group_kind_name(kind));
}

RankGroups make_rank_groups(int world, ParallelSizes sizes) {
  HELIX_CHECK(world >= 1, "world size: expected at least 1 rank, got {}", world);
  HELIX_CHECK(sizes.tp >= 1, "--tp: expected a size >= 1, got {}", sizes.tp);
  HELIX_CHECK(sizes.cp >= 1, "--cp: expected a size >= 1, got {}", sizes.cp);
  HELIX_CHECK(sizes.pp >= 1, "--pp: expected a size >= 1, got {}", sizes.pp);
  HELIX_CHECK(sizes.dp >= 0, "--dp: expected a size >= 1 (or 0 to derive it), got {}", sizes.dp);
  const int64_t model = int64_t{sizes.tp} * sizes.cp * sizes.pp;
  HELIX_CHECK(world % model == 0,
              "--tp {} x --cp {} x --pp {} = {} must divide the world size, got {} ranks: launch a "
              "multiple of {} ranks or change the sizes",
              sizes.tp, sizes.cp, sizes.pp, model, world, model);
  const int dp = static_cast<int>(world / model);
  HELIX_CHECK(
      sizes.dp == 0 || sizes.dp == dp,
      "--dp {}: expected world / (tp*cp*pp) = {} / {} = {}, got {} (leave --dp out to derive it)",
      sizes.dp, world, model, dp, sizes.dp);
  sizes.dp = dp;

  RankGroups g;
  g.world_ = world;
  g.sizes_ = sizes;
  for (GroupKind kind : kAllGroupKinds) {
    const VaryingDims v = varying(kind);
    auto& groups = g.groups_[static_cast<size_t>(kind)];
    auto& index = g.index_of_rank_[static_cast<size_t>(kind)];
    index.assign(static_cast<size_t>(world), -1);
    // The fixed coordinates name the group; ranks ascend, so groups come out ordered by first rank.
    std::map<std::array<int, 4>, int> by_key;
    for (int r = 0; r < world; ++r) {
      const RankCoords c = g.coords(r);
      const std::array<int, 4> key = {v.tp ? -1 : c.tp, v.cp ? -1 : c.cp, v.dp ? -1 : c.dp,
                                      v.pp ? -1 : c.pp};
      auto [it, inserted] = by_key.emplace(key, static_cast<int>(groups.size()));
      if (inserted) groups.emplace_back();
      groups[static_cast<size_t>(it->second)].push_back(r);
      index[static_cast<size_t>(r)] = it->second;
    }
  }
  return g;
}

}  // namespace helix
