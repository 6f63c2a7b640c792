// Embedding: parameter validation, device dispatch and the CPU reference (token dropout in the fp32
// op order of token_dropout.h; backward sums each id's tokens in token order in double).
#include <algorithm>
#include <vector>

#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/embedding/embedding.h"
#include "kernels/embedding/token_dropout.h"

namespace helix {
namespace {

using elem::from_float;
using elem::to_float;

constexpr const char* kFwd = "embedding_fwd";
constexpr const char* kBwd = "embedding_bwd";

void validate_common(const char* op, const Tensor& ids, const Tensor& rows, const char* rows_name,
                     int64_t V, int64_t C, const EmbeddingTokenDropout& td) {
  HELIX_CHECK(ids.defined() && ids.ndim() == 1 && ids.dtype() == DType::kI32,
              "{}: expected ids i32 [T], got {}", op, ids.str());
  const int64_t T = ids.dim(0);
  HELIX_CHECK(rows.defined() && rows.shape() == Shape({T, C}),
              "{}: expected {} of shape [{}, {}], got {}", op, rows_name, T, C, rows.str());
  elem::visit_f32_bf16(rows.dtype(), op, rows_name, [](auto) {});
  if (!td.enabled) return;
  HELIX_CHECK(td.mask_token_id >= 0 && td.mask_token_id < V,
              "{}: token dropout expected mask_token_id in [0, {}), got {}", op, V,
              td.mask_token_id);
  HELIX_CHECK(td.cu_seqlens.defined() && td.cu_seqlens.ndim() == 1 && td.cu_seqlens.dim(0) >= 1 &&
                  td.cu_seqlens.dtype() == DType::kI32,
              "{}: token dropout expected cu_seqlens i32 [b+1], got {}", op, td.cu_seqlens.str());
  checks::cu_seqlens_values(op, td.cu_seqlens, T);
}

void validate(const EmbeddingFwdParams& p) {
  HELIX_CHECK(p.table.defined() && p.table.ndim() == 2, "{}: expected table [V, C], got {}", kFwd,
              p.table.str());
  const int64_t V = p.table.dim(0), C = p.table.dim(1);
  HELIX_CHECK(V > 0 && V < (int64_t{1} << 31), "{}: expected 0 < V < 2^31, got table {}", kFwd,
              p.table.str());
  elem::visit_f32_bf16(p.table.dtype(), kFwd, "table", [](auto) {});
  checks::same_device_contiguous(kFwd, p.table,
                                 {{&p.ids, "ids"},
                                  {&p.table, "table"},
                                  {&p.out, "out"},
                                  {&p.token_dropout.cu_seqlens, "cu_seqlens"}});
  validate_common(kFwd, p.ids, p.out, "out", V, C, p.token_dropout);
}

void validate(const EmbeddingBwdParams& p) {
  HELIX_CHECK(p.dtable.defined() && p.dtable.ndim() == 2 && p.dtable.dtype() == DType::kF32,
              "{}: expected dtable f32 [V, C], got {}", kBwd, p.dtable.str());
  const int64_t V = p.dtable.dim(0), C = p.dtable.dim(1);
  HELIX_CHECK(V > 0 && V < (int64_t{1} << 31), "{}: expected 0 < V < 2^31, got dtable {}", kBwd,
              p.dtable.str());
  checks::same_device_contiguous(kBwd, p.dtable,
                                 {{&p.ids, "ids"},
                                  {&p.dout, "dout"},
                                  {&p.dtable, "dtable"},
                                  {&p.token_dropout.cu_seqlens, "cu_seqlens"}});
  validate_common(kBwd, p.ids, p.dout, "dout", V, C, p.token_dropout);
}

// Per token, the token-dropout denominator of its segment (NaN-free for every real token).
std::vector<float> token_denoms(const int32_t* ids, int64_t T, const EmbeddingTokenDropout& td) {
  const int32_t* cu = td.cu_seqlens.data<int32_t>();
  const int64_t b = td.cu_seqlens.numel() - 1;
  std::vector<float> out(static_cast<size_t>(T));
  for (int64_t s = 0; s <= b; ++s) {
    const int64_t start = cu[s], end = s < b ? cu[s + 1] : T;
    int64_t masked = 0;
    for (int64_t t = start; t < end; ++t) masked += ids[t] == td.mask_token_id;
    for (int64_t t = start; t < end; ++t) out[t] = token_dropout::denom(masked, end - start);
  }
  return out;
}

void check_id(const char* op, int32_t id, int64_t V, int64_t t) {
  HELIX_CHECK(id >= 0 && id < V, "{}: expected ids in [0, {}), got {} at token {}", op, V, id, t);
}

template <typename W, typename O>
void fwd_cpu(const EmbeddingFwdParams& p) {
  const int64_t T = p.ids.dim(0), V = p.table.dim(0), C = p.table.dim(1);
  const int32_t* ids = p.ids.data<int32_t>();
  const W* table = p.table.data<W>();
  O* out = p.out.data<O>();
  const EmbeddingTokenDropout& td = p.token_dropout;
  const std::vector<float> denoms = td.enabled ? token_denoms(ids, T, td) : std::vector<float>();
  for (int64_t t = 0; t < T; ++t) {
    check_id(kFwd, ids[t], V, t);
    const W* row = table + static_cast<int64_t>(ids[t]) * C;
    O* o = out + t * C;
    if (!td.enabled) {
      for (int64_t c = 0; c < C; ++c) o[c] = from_float<O>(to_float(row[c]));
    } else if (ids[t] == td.mask_token_id) {
      for (int64_t c = 0; c < C; ++c) o[c] = from_float<O>(0.f);
    } else {
      for (int64_t c = 0; c < C; ++c)
        o[c] = from_float<O>(token_dropout::apply<W>(to_float(row[c]), denoms[t]));
    }
  }
}

template <typename O>
void bwd_cpu(const EmbeddingBwdParams& p) {
  const int64_t T = p.ids.dim(0), V = p.dtable.dim(0), C = p.dtable.dim(1);
  const int32_t* ids = p.ids.data<int32_t>();
  const O* dout = p.dout.data<O>();
  float* dtable = p.dtable.data<float>();
  const EmbeddingTokenDropout& td = p.token_dropout;
  const std::vector<float> denoms = td.enabled ? token_denoms(ids, T, td) : std::vector<float>();
  // Tokens grouped by id, each group in token order (a counting sort), masked tokens left out.
  std::vector<int64_t> start(static_cast<size_t>(V) + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    check_id(kBwd, ids[t], V, t);
    if (!(td.enabled && ids[t] == td.mask_token_id)) ++start[ids[t] + 1];
  }
  for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
  std::vector<int64_t> order(static_cast<size_t>(start[V])), fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t)
    if (!(td.enabled && ids[t] == td.mask_token_id)) order[fill[ids[t]]++] = t;
  std::vector<double> acc(static_cast<size_t>(C));
  for (int64_t v = 0; v < V; ++v) {
    if (start[v] == start[v + 1]) continue;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t k = start[v]; k < start[v + 1]; ++k) {
      const int64_t t = order[k];
      const double s = td.enabled ? token_dropout::grad_scale(denoms[t]) : 1.0;
      for (int64_t c = 0; c < C; ++c) acc[c] += to_float(dout[t * C + c]) * s;
    }
    for (int64_t c = 0; c < C; ++c)
      dtable[v * C + c] = static_cast<float>(dtable[v * C + c] + acc[c]);
  }
}

}  // namespace

void detail::embedding_fwd_cpu(const EmbeddingFwdParams& p) {
  elem::visit_f32_bf16(p.table.dtype(), kFwd, "table", [&](auto wt) {
    elem::visit_f32_bf16(p.out.dtype(), kFwd, "out",
                         [&](auto ot) { fwd_cpu<decltype(wt), decltype(ot)>(p); });
  });
}

void detail::embedding_bwd_cpu(const EmbeddingBwdParams& p) {
  elem::visit_f32_bf16(p.dout.dtype(), kBwd, "dout", [&](auto ot) { bwd_cpu<decltype(ot)>(p); });
}

void embedding_fwd(const EmbeddingFwdParams& p, const Stream& stream) {
  validate(p);
  if (p.table.is_cpu()) return detail::embedding_fwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::embedding_fwd_cuda(p, stream);
#else
  HELIX_FAIL("{}: table is on {}, but helix was built without CUDA", kFwd, p.table.device().str());
#endif
}

void embedding_bwd(const EmbeddingBwdParams& p, const Stream& stream) {
  validate(p);
  if (p.dtable.is_cpu()) return detail::embedding_bwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::embedding_bwd_cuda(p, stream);
#else
  HELIX_FAIL("{}: dtable is on {}, but helix was built without CUDA", kBwd,
             p.dtable.device().str());
#endif
}

}  // namespace helix
