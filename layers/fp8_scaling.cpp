#include "layers/fp8_scaling.h"

#include "core/error.h"
#include "kernels/cast/cast.h"

namespace helix {

Fp8FormatRecipe parse_fp8_format(const std::string& s) {
  if (s == "e4m3") return Fp8FormatRecipe::kE4M3;
  if (s == "hybrid") return Fp8FormatRecipe::kHybrid;
  HELIX_FAIL("--fp8-format: expected e4m3 or hybrid, got '{}'", s);
}

Fp8AmaxAlgo parse_fp8_amax_algo(const std::string& s) {
  if (s == "max") return Fp8AmaxAlgo::kMax;
  if (s == "most_recent") return Fp8AmaxAlgo::kMostRecent;
  HELIX_FAIL("--amax-algo: expected max or most_recent, got '{}'", s);
}

Fp8AmaxGroup parse_fp8_amax_group(const std::string& s) {
  if (s == "tp") return Fp8AmaxGroup::kTp;
  if (s == "tp-cp-dp") return Fp8AmaxGroup::kTpCpDp;
  HELIX_FAIL("--fp8-amax-group: expected tp or tp-cp-dp, got '{}'", s);
}

Fp8ScalingManager::Fp8ScalingManager(const Fp8ScalingOptions& o)
    : recipe_(o.recipe), layers_(o.layers), group_(o.amax_group) {
  HELIX_CHECK(o.layers >= 1, "fp8: expected at least one layer, got {}", o.layers);
  HELIX_CHECK(recipe_.amax_history_len >= 1, "--amax-history: expected >= 1, got {}", recipe_.amax_history_len);
  HELIX_CHECK(recipe_.margin >= 0 && recipe_.margin <= 64, "--fp8-margin: expected 0..64, got {}", recipe_.margin);
  n_ = int64_t{o.layers} * kGemmsPerLayer * kOperandsPerGemm;
  const int64_t len = recipe_.amax_history_len;
  buffer_ = Tensor::zeros({n_ * (len + 3)}, DType::kF32, o.device);
  amax_ = buffer_.slice(0, n_);
  history_ = buffer_.slice(n_, n_ * (len + 1)).view({len, n_});
  scale_ = buffer_.slice(n_ * (len + 1), n_ * (len + 2));
  scale_inv_ = buffer_.slice(n_ * (len + 2), n_ * (len + 3));
  scale_.fill(1.0);
  scale_inv_.fill(1.0);
  std::vector<float> fmax(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i)
    fmax[static_cast<size_t>(i)] =
        static_cast<float>(dtype_max(dtype(static_cast<Fp8Operand>(i % kOperandsPerGemm))));
  fp8_max_ = Tensor::from_vector<float>(fmax, Shape{n_}, o.device);
}

int Fp8ScalingManager::slot(int layer, Fp8Gemm gemm, Fp8Operand operand) const {
  HELIX_CHECK(layer >= 0 && layer < layers_, "fp8: expected a layer in [0, {}), got {}", layers_, layer);
  return (layer * kGemmsPerLayer + static_cast<int>(gemm)) * kOperandsPerGemm + static_cast<int>(operand);
}

DType Fp8ScalingManager::dtype(Fp8Operand operand) const {
  return operand == Fp8Operand::kGradOutput && recipe_.format == Fp8FormatRecipe::kHybrid ? DType::kE5M2
                                                                                           : DType::kE4M3;
}

const Fp8Weight& Fp8ScalingManager::weight(int slot, const Tensor& w, const Stream& stream) {
  HELIX_CHECK(slot >= 0 && slot < n_ && slot % kOperandsPerGemm == static_cast<int>(Fp8Operand::kWeight),
              "fp8: expected a weight operand slot, got {}", slot);
  HELIX_CHECK(w.ndim() == 2, "fp8: expected a weight [out, in], got {}", w.str());
  auto it = cache_.find(slot);
  // Same storage as the cached cast: reuse it. Another buffer (e.g. a weight gathered afresh by a
  // sharded-parameter scheme) is cast again: correct, only slower (its amax is the same).
  if (it != cache_.end() && it->second.first == w.data_ptr()) return it->second.second;
  Fp8Weight c{Tensor::empty(w.shape(), DType::kE4M3, w.device(), stream),
              Tensor::empty({w.dim(1), w.dim(0)}, DType::kE4M3, w.device(), stream)};
  cast_transpose_fp8(CastTransposeFp8Params{.in = w, .out = c.w, .out_t = c.w_t, .scale = scale(slot), .amax = amax(slot), .act = CastActivation::kNone, .pre = {}, .dbias = {}},
                     stream);
  auto& entry = cache_[slot];
  entry = std::make_pair(w.data_ptr(), std::move(c));
  return entry.second;
}

void Fp8ScalingManager::update(const Stream& stream) {
  fp8_amax_canonicalize(amax_, stream);
  if (group_ != nullptr && group_->size() > 1) group_->all_reduce(amax_, ReduceOp::kMax, stream);
  Fp8ScalingUpdateParams p;
  p.amax = amax_;
  p.history = history_;
  p.scale = scale_;
  p.scale_inv = scale_inv_;
  p.fp8_max = fp8_max_;
  p.algo = recipe_.amax_algo;
  p.margin = recipe_.margin;
  fp8_scaling_update(p, stream);
  cache_.clear();
  ++updates_;
}

std::vector<std::pair<std::string, Tensor>> Fp8ScalingManager::state() const {
  return {{"fp8.amax_history", history_.to(Device::cpu())},
          {"fp8.scale", scale_.to(Device::cpu())},
          {"fp8.scale_inv", scale_inv_.to(Device::cpu())}};
}

void Fp8ScalingManager::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  const auto find = [&](const std::string& name, const Tensor& like) {
    for (const auto& [k, t] : state)
      if (k == name) {
        HELIX_CHECK(t.shape() == like.shape() && t.dtype() == DType::kF32,
                    "fp8 state '{}': expected f32 {}, got {} (another model size or --amax-history?)", name,
                    like.shape().str(), t.str());
        return t;
      }
    HELIX_FAIL("fp8 state: tensor '{}' is missing", name);
  };
  history_.copy_from(find("fp8.amax_history", history_).to(history_.device()));
  scale_.copy_from(find("fp8.scale", scale_).to(scale_.device()));
  scale_inv_.copy_from(find("fp8.scale_inv", scale_inv_).to(scale_inv_.device()));
  amax_.zero();
  cache_.clear();
}

}  // namespace helix
