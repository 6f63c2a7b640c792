#include "parallel/dp_grad_reducer.h"

#include <map>

#include "core/error.h"

namespace helix {

struct DpGradReducer::Bucket {
  DType dtype = DType::kF32;
  int64_t numel = 0;
  Tensor buffer;  // [numel], the slots of its parameters (128-byte aligned) back to back
  std::vector<size_t> params;    // slot order
  size_t pending = 0;            // gradients not ready yet in this step
  std::unique_ptr<Event> ready;  // compute stream: the bucket's gradients are written
  std::unique_ptr<Event> done;   // comm stream: the reduction finished
};

namespace {
constexpr size_t kSlotAlignBytes = 128;  // vectorised kernels writing into a slot stay aligned
}

DpGradReducer::DpGradReducer(Communicator& comm, std::vector<Var> params, DpReducerOptions options)
    : comm_(&comm), opts_(std::move(options)) {
  HELIX_CHECK(opts_.bucket_bytes > 0, "bucket size: expected > 0 bytes, got {}",
              opts_.bucket_bytes);
  for (size_t i = 0; i < params.size(); ++i) {
    HELIX_CHECK(params[i].defined(), "DpGradReducer: parameter {} is undefined", i);
    cells_.push_back(params[i].cell());
    if (i == 0) device_ = cells_[0]->device;
    HELIX_CHECK(cells_[i]->device == device_,
                "DpGradReducer: expected every parameter on {}, parameter {} ('{}') is on {}",
                device_.str(), i, cells_[i]->name, cells_[i]->device.str());
    const DType t = cells_[i]->grad_dtype;
    HELIX_CHECK(t == DType::kF32 || t == DType::kBF16 || t == DType::kF64,
                "DpGradReducer: parameter {} ('{}'): expected an f32, bf16 or f64 gradient, got {}",
                i, cells_[i]->name, dtype_name(t));
  }
  if (device_.is_cuda() && opts_.comm_stream.device().is_cpu())
    opts_.comm_stream = Stream::create(device_);

  // Fill buckets from the last parameter backwards; one open bucket per gradient dtype.
  slots_.resize(cells_.size());
  std::map<DType, size_t> open;
  for (size_t k = cells_.size(); k-- > 0;) {
    const DType t = cells_[k]->grad_dtype;
    auto it = open.find(t);
    if (it == open.end()) {
      auto b = std::make_unique<Bucket>();
      b->dtype = t;
      buckets_.push_back(std::move(b));
      it = open.emplace(t, buckets_.size() - 1).first;
    }
    Bucket& b = *buckets_[it->second];
    const int64_t align = static_cast<int64_t>(kSlotAlignBytes / dtype_size(t));
    const int64_t offset = (b.numel + align - 1) / align * align;
    slots_[k] = {it->second, offset};
    b.params.push_back(k);
    b.numel = offset + cells_[k]->shape.numel();
    if (static_cast<size_t>(b.numel) * dtype_size(t) >= opts_.bucket_bytes) open.erase(it);
  }
  for (auto& b : buckets_) {
    b->buffer = Tensor::zeros({b->numel}, b->dtype, device_,
                              device_.is_cuda() ? opts_.comm_stream : Stream());
    b->pending = b->params.size();
    b->ready = std::make_unique<Event>(device_);
    b->done = std::make_unique<Event>(device_);
  }
  if (device_.is_cuda())
    opts_.comm_stream.synchronize();  // buffers zeroed before first use anywhere
  ready_.assign(cells_.size(), false);
}

DpGradReducer::~DpGradReducer() = default;

std::vector<size_t> DpGradReducer::bucket_params(size_t b) const {
  HELIX_CHECK(b < buckets_.size(), "bucket {}: only {} buckets", b, buckets_.size());
  return buckets_[b]->params;
}

Tensor DpGradReducer::slot_view(size_t param) const {
  const Slot& s = slots_[param];
  const GradCell& c = *cells_[param];
  return buckets_[s.bucket]->buffer.slice(s.offset, s.offset + c.shape.numel()).view(c.shape);
}

void DpGradReducer::zero_grad(const Stream& stream) {
  HELIX_CHECK(next_launch_ == 0,
              "DpGradReducer::zero_grad: {} buckets are being reduced; call finish() first",
              next_launch_);
  for (auto& b : buckets_) b->buffer.zero(stream);
  for (size_t i = 0; i < cells_.size(); ++i) cells_[i]->grad = slot_view(i);
}

void DpGradReducer::mark_ready(size_t param, const Stream& compute_stream) {
  HELIX_CHECK(param < cells_.size(), "DpGradReducer::mark_ready: parameter {} of {}", param,
              cells_.size());
  HELIX_CHECK(!ready_[param],
              "DpGradReducer::mark_ready: parameter {} ('{}') marked ready twice in one step",
              param, cells_[param]->name);
  ready_[param] = true;
  --buckets_[slots_[param].bucket]->pending;
  while (next_launch_ < buckets_.size() && buckets_[next_launch_]->pending == 0) {
    launch(next_launch_, compute_stream);
    ++next_launch_;
  }
}

void DpGradReducer::launch(size_t b, const Stream& compute_stream) {
  Bucket& bucket = *buckets_[b];
  // Gradients not written through their slot (dropped by Var::zero_grad, or never reached by
  // backward) are copied in or zeroed there; from now on every gradient is its slot.
  for (size_t p : bucket.params) {
    Tensor slot = slot_view(p);
    Tensor& g = cells_[p]->grad;
    if (!g.defined()) {
      slot.zero(compute_stream);
    } else if (g.data_ptr() != slot.data_ptr()) {
      HELIX_CHECK(g.shape() == slot.shape() && g.dtype() == slot.dtype(),
                  "DpGradReducer: gradient of parameter {} ('{}') is {}, expected {}", p,
                  cells_[p]->name, g.str(), slot.str());
      slot.copy_from(g, compute_stream);
    }
    g = slot;
  }
  if (device_.is_cuda()) {
    bucket.ready->record(compute_stream);
    bucket.ready->wait(opts_.comm_stream);
    comm_->all_reduce(bucket.buffer, opts_.op, opts_.comm_stream);
    bucket.done->record(opts_.comm_stream);
  } else {
    comm_->all_reduce(bucket.buffer, opts_.op, compute_stream);
  }
}

void DpGradReducer::finish(const Stream& compute_stream) {
  for (size_t k = cells_.size(); k-- > 0;)
    if (!ready_[k]) mark_ready(k, compute_stream);
  HELIX_CHECK(next_launch_ == buckets_.size(), "DpGradReducer::finish: {} of {} buckets launched",
              next_launch_, buckets_.size());
  if (device_.is_cuda())
    for (auto& b : buckets_) b->done->wait(compute_stream);
  // Next step.
  ready_.assign(cells_.size(), false);
  for (auto& b : buckets_) b->pending = b->params.size();
  next_launch_ = 0;
}

}  // namespace helix
