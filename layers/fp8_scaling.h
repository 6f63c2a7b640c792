#pragma once
// Fp8ScalingManager: FP8 delayed scaling for every FP8 GEMM operand of the model (input, weight,
// grad-output of QKV, out-projection, FC1 and FC2 of every layer). Design: all state in ONE flat
// f32 device buffer [amax n | history len*n | scale n | scale_inv n], so a step costs one
// all-reduce(MAX) over the amax group and one update kernel (kernels/fp8_scaling), whatever the
// model size; the weights' fp8 copies are cast once per step and cached here. See docs/fp8.md.
//
// Timing (delayed scaling): every cast and GEMM of step k uses scale / scale_inv as they stand
// after update() of step k-1; step k's casts accumulate amaxes into `amax`; update() at the end of
// step k (after the last micro-batch's backward, before the optimizer) reduces them over the group,
// rolls the histories and writes the scales of step k+1. Step 0 runs with scale 1 (history empty);
// its update calibrates from step 0's amaxes alone (the zero history adds nothing to the max).
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "kernels/fp8_scaling/fp8_scaling.h"
#include "parallel/communicator.h"

namespace helix {

enum class Fp8FormatRecipe : uint8_t { kE4M3, kHybrid };  // hybrid: E4M3 forward, E5M2 grad-output
enum class Fp8AmaxGroup : uint8_t { kTp, kTpCpDp };        // ranks whose amaxes are reduced together
enum class Fp8Gemm : uint8_t { kQkv, kOutProj, kFc1, kFc2 };
enum class Fp8Operand : uint8_t { kInput, kWeight, kGradOutput };

struct Fp8Recipe {
  Fp8FormatRecipe format = Fp8FormatRecipe::kHybrid;
  int64_t amax_history_len = 1024;
  Fp8AmaxAlgo amax_algo = Fp8AmaxAlgo::kMax;
  int margin = 0;
  Fp8AmaxGroup amax_group = Fp8AmaxGroup::kTpCpDp;
};

// Flag parsing (--fp8-format, --amax-algo, --fp8-amax-group); throws naming the flag.
Fp8FormatRecipe parse_fp8_format(const std::string& s);
Fp8AmaxAlgo parse_fp8_amax_algo(const std::string& s);
Fp8AmaxGroup parse_fp8_amax_group(const std::string& s);

struct Fp8ScalingOptions {
  Fp8Recipe recipe;
  int layers = 0;           // transformer layers (4 FP8 GEMMs x 3 operands each)
  Device device;            // where the buffer lives (the model's device)
  Communicator* amax_group = nullptr;  // the amax all-reduce group; null = this process alone
};

// A weight's fp8 copies for one step: w for the forward, w_t for the dgrad (TN-only FP8 GEMMs).
struct Fp8Weight {
  Tensor w;    // [out, in] e4m3
  Tensor w_t;  // [in, out] e4m3
};

class Fp8ScalingManager {
 public:
  static constexpr int kGemmsPerLayer = 4;
  static constexpr int kOperandsPerGemm = 3;

  explicit Fp8ScalingManager(const Fp8ScalingOptions& options);

  const Fp8Recipe& recipe() const { return recipe_; }
  int64_t num_operands() const { return n_; }
  int64_t history_len() const { return recipe_.amax_history_len; }
  int64_t updates() const { return updates_; }  // update() calls so far (steps)

  // Operand index in the flat buffer: (layer * 4 + gemm) * 3 + operand.
  int slot(int layer, Fp8Gemm gemm, Fp8Operand operand) const;
  DType dtype(Fp8Operand operand) const;  // E4M3, or E5M2 for grad-output under hybrid

  // [1] f32 views into the flat buffer.
  Tensor amax(int slot) const { return amax_.slice(slot, slot + 1); }
  Tensor scale(int slot) const { return scale_.slice(slot, slot + 1); }
  Tensor scale_inv(int slot) const { return scale_inv_.slice(slot, slot + 1); }
  // Whole-buffer views: amax [n], history [len, n], scale [n], scale_inv [n].
  const Tensor& amaxes() const { return amax_; }
  const Tensor& history() const { return history_; }
  const Tensor& scales() const { return scale_; }
  const Tensor& scale_invs() const { return scale_inv_; }

  // The fp8 copies of weight w [out, in] for operand `slot`: cast-transposed on the first call of
  // a step (recording the weight's amax), the cache afterwards (micro-batches, recompute) as long
  // as w is the same storage (another buffer is cast again). The reference is valid until the next
  // weight() call for this slot or update().
  const Fp8Weight& weight(int slot, const Tensor& w, const Stream& stream);

  // End of step: canonicalise the amaxes (NaN -> inf), ONE all-reduce(MAX) over the amax group of
  // every amax (forward and backward operands together), roll histories, new scales, amax := 0,
  // drop the weight cache. Collective over the amax group. Call it once per optimizer step, before
  // the optimizer changes the weights (the cache is keyed by the weight's storage, not its values).
  void update(const Stream& stream);

  // Checkpoint state, f32 CPU copies, identical on every rank of the amax group:
  //   fp8.amax_history [len, n], fp8.scale [n], fp8.scale_inv [n].
  std::vector<std::pair<std::string, Tensor>> state() const;
  // Restores state() (names and shapes checked, naming what is wrong); clears the weight cache.
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state);

 private:
  Fp8Recipe recipe_;
  int layers_;
  int64_t n_;
  Communicator* group_;
  Tensor buffer_;     // [n * (len + 3)] f32: amax | history | scale | scale_inv
  Tensor amax_;       // [n] view
  Tensor history_;    // [len, n] view
  Tensor scale_;      // [n] view
  Tensor scale_inv_;  // [n] view
  Tensor fp8_max_;    // [n] f32, constant
  int64_t updates_ = 0;
  std::map<int, std::pair<const void*, Fp8Weight>> cache_;  // slot -> (source data, fp8 copies)
};

}  // namespace helix
