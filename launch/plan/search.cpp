#include "launch/plan/search.h"

#include <algorithm>
#include <map>
#include <tuple>

#include "core/log.h"

namespace helix {

SearchResult search_layouts(const PlanInput& base, const Calibration& cal,
                            const SearchOptions& opts) {
  SearchResult out;
  const double gib = double(1ull << 30);
  for (int tp : opts.tp)
    for (int cp : opts.cp)
      for (int pp : opts.pp)
        for (int v : opts.virtual_stages) {
          if (v > 1 && pp == 1) continue;  // interleaving needs a pipeline: not a layout of its own
          for (int zero : opts.zero) {
            // Best rejection of this family: a rule (least informative) < bubble < memory (closest
            // to fitting).
            SearchRejection rej;
            int rej_rank = -1;
            double rej_need = 0;
            bool any_feasible = false;
            for (int mb : opts.micro_batches)
              for (RecomputeMode rc : opts.recompute) {
                PlanInput in = base;
                in.layout = PlanLayout{tp, cp, pp, v, zero, mb, rc, base.layout.sequence_parallel};
                PlanResult r = make_plan(in, cal);
                ++out.evaluated;
                if (!r.error.empty()) {
                  if (rej_rank < 0) {
                    rej = {in.layout, "rule: " + r.error};
                    rej_rank = 0;
                  }
                  continue;
                }
                if (!r.fits) {
                  const double need = r.memory.total() + r.reserved_bytes;
                  if (rej_rank < 2 || need < rej_need) {
                    rej = {in.layout,
                           fmt::format(
                               "memory: needs {:.1f} GiB per rank (stage {}), {:.1f} GiB usable",
                               need / gib, r.worst_stage, r.capacity_bytes / gib)};
                    rej_rank = 2;
                    rej_need = need;
                  }
                  continue;
                }
                if (r.bubble_fraction > opts.max_bubble) {
                  if (rej_rank < 1) {
                    rej = {in.layout,
                           fmt::format("bubble: {:.0f}% of the step idle (limit {:.0f}%)",
                                       100 * r.bubble_fraction, 100 * opts.max_bubble)};
                    rej_rank = 1;
                  }
                  continue;
                }
                any_feasible = true;
                out.feasible.push_back({in.layout, std::move(r)});
              }
            if (!any_feasible && rej_rank >= 0) out.rejected.push_back(rej);
          }
        }
  // Rejections closest to working first: memory, then bubble, then broken rules.
  const auto order = [](const SearchRejection& r) {
    return r.reason.starts_with("memory:") ? 0 : r.reason.starts_with("bubble:") ? 1 : 2;
  };
  std::stable_sort(
      out.rejected.begin(), out.rejected.end(),
      [&](const SearchRejection& a, const SearchRejection& b) { return order(a) < order(b); });
  std::stable_sort(out.feasible.begin(), out.feasible.end(),
                   [](const SearchCandidate& a, const SearchCandidate& b) {
                     if (a.result.tokens_per_second != b.result.tokens_per_second)
                       return a.result.tokens_per_second > b.result.tokens_per_second;
                     return a.result.memory.total() < b.result.memory.total();
                   });
  return out;
}

}  // namespace helix
