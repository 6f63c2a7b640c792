#include "launch/fp8_setup.h"

#include "core/error.h"
#include "core/log.h"

namespace helix {

Fp8Recipe fp8_recipe_of(const TrainOptions& o) {
  Fp8Recipe r;
  r.format = parse_fp8_format(o.fp8_format);
  r.amax_algo = parse_fp8_amax_algo(o.amax_algo);
  r.amax_group = parse_fp8_amax_group(o.fp8_amax_group);
  HELIX_CHECK(o.amax_history >= 1, "--amax-history: expected >= 1, got {}", o.amax_history);
  HELIX_CHECK(o.fp8_margin >= 0 && o.fp8_margin <= 64, "--fp8-margin: expected 0..64, got {}", o.fp8_margin);
  r.amax_history_len = o.amax_history;
  r.margin = o.fp8_margin;
  return r;
}

std::unique_ptr<Fp8ScalingManager> make_fp8_manager(const TrainOptions& o, const ParallelContext& ctx,
                                                    Device device, bool log) {
  if (o.fp8 == "none") return nullptr;
  HELIX_CHECK(o.fp8 == "delayed", "--fp8: expected none or delayed, got '{}'", o.fp8);
  if (device.is_cuda()) {
    const int cc = cuda_compute_capability(device.index);
    HELIX_CHECK(cc >= 89,
                "--fp8 delayed: needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
                "GPU {} has compute capability {}.{}",
                device.index, cc / 10, cc % 10);
  }
  Fp8ScalingOptions so;
  so.recipe = fp8_recipe_of(o);
  so.layers = o.model_config.layers;
  so.device = device;
  so.amax_group = so.recipe.amax_group == Fp8AmaxGroup::kTp ? &ctx.tp() : &ctx.amax();
  if (log)
    log_info("fp8: delayed scaling, format {}, amax history {}, algo {}, margin {}, amax group {} ({} ranks){}",
             o.fp8_format, o.amax_history, o.amax_algo, o.fp8_margin, o.fp8_amax_group, so.amax_group->size(),
             device.is_cpu() ? "; CPU run: FP8 casts and GEMMs are emulated bit-exactly (slow, for testing)" : "");
  return std::make_unique<Fp8ScalingManager>(so);
}

}  // namespace helix
