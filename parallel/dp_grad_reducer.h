#pragma once
// Data-parallel gradient reduction in buckets (PyTorch DDP, Megatron's grad buffer). Parameters'
// gradients live in flat per-dtype buffers of ~25 MB ("buckets"): zero_grad() points every gradient
// at its slot, so backward accumulates straight into the bucket. One all-reduce per bucket
// (averaged over the group by default). The overlap hook: mark_ready(i) says parameter i's gradient
// is final; a bucket launches as soon as all its gradients are, on a separate communication stream
// that waits for an event of the compute stream, so on the GPU the reduction of late layers
// overlaps the backward of early ones. On CPU ranks (and for the host-staged MPI backend) a launch
// runs to completion inline. Buckets launch in one fixed order on every rank (bucket 0 first),
// which keeps the collectives matched even when ranks mark gradients ready in different orders.
#include <cstddef>
#include <memory>
#include <vector>

#include "core/autograd.h"
#include "parallel/communicator.h"

namespace helix {

struct DpReducerOptions {
  size_t bucket_bytes = size_t{25} << 20;  // a bucket closes once it holds at least this many bytes
  ReduceOp op = ReduceOp::kAvg;            // kAvg: mean over the group; kSum: sum
  Stream comm_stream;  // CUDA: where reductions run (a new stream when left as the CPU stream)
};

class DpGradReducer {
 public:
  // `params`: every parameter whose gradient is reduced, in forward (creation) order; all on one
  // device. Buckets are filled from the last parameter backwards (the order gradients arrive in).
  DpGradReducer(Communicator& comm, std::vector<Var> params, DpReducerOptions options = {});
  ~DpGradReducer();
  DpGradReducer(const DpGradReducer&) = delete;
  DpGradReducer& operator=(const DpGradReducer&) = delete;

  // Zeroes every bucket and points every parameter's gradient at its slot. Call before the first
  // backward of a step.
  void zero_grad(const Stream& stream);
  // Parameter i's gradient is final for this step (the last micro-batch's backward is past its last
  // use). Launches, in bucket order, every bucket whose gradients are all ready.
  void mark_ready(size_t param, const Stream& compute_stream);
  // Marks the rest ready, launches what is left and makes `compute_stream` wait for every
  // reduction. Afterwards every gradient is the reduced one, a view into its bucket. Starts the
  // next step.
  void finish(const Stream& compute_stream);

  size_t num_buckets() const { return buckets_.size(); }
  size_t num_launched() const { return next_launch_; }
  // Parameter indices in bucket b, in slot order.
  std::vector<size_t> bucket_params(size_t b) const;

 private:
  struct Slot {
    size_t bucket = 0;
    int64_t offset = 0;  // elements into the bucket
  };
  struct Bucket;
  void launch(size_t b, const Stream& compute_stream);
  Tensor slot_view(size_t param) const;

  Communicator* comm_;
  DpReducerOptions opts_;
  Device device_;
  std::vector<std::shared_ptr<GradCell>> cells_;
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::vector<bool> ready_;
  size_t next_launch_ = 0;
};

}  // namespace helix
