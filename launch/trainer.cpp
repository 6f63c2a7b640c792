#include "launch/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>

#include "core/allocator.h"
#include "core/json.h"
#include "core/log.h"
#include "launch/checkpoint.h"
#include "launch/data/loader.h"
#include "launch/fp8_setup.h"
#include "launch/metrics.h"
#include "launch/pipeline_step.h"
#include "layers/esm2.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "layers/zero_optimizer.h"
#include "layers/zero_sync.h"
#include "parallel/context.h"

namespace helix {
namespace {

std::vector<int> seqlens_of(const PackedBatch& b) {
  const std::vector<int32_t> cu = b.cu_seqlens.to_vector<int32_t>();
  std::vector<int> s;
  for (size_t i = 0; i + 1 < cu.size(); ++i) s.push_back(cu[i + 1] - cu[i]);
  return s;
}

// Every rank evaluates the same batches (the model may be split over tp; dp ranks repeat the work).
double evaluate(Esm2Model& model, const DataLoader& valid, int64_t batches, const Stream& stream, int64_t* tokens,
                Esm2Pipeline* pipeline) {
  const int64_t n = std::min(batches, valid.num_batches(0));
  double loss_sum = 0, count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ThdBatch b = to_thd_batch(valid.batch(0, i), model.options().device);
    count += b.num_labels;
    if (pipeline) {  // forward through the stages; the last one's loss on every stage
      loss_sum += pipeline->eval_loss({b}, stream);
      continue;
    }
    TapeOptions o;
    o.stream = stream;
    o.record = false;
    Tape tape(o);
    Var logits = model.forward(tape, b);
    Var loss = model.loss(tape, logits, b, 1.0f);
    loss_sum += loss.data().to_floats()[0];
  }
  *tokens = static_cast<int64_t>(count);
  return count > 0 ? loss_sum / count : std::nan("");
}

// Per-rank memory after the first step: the persistent buffers (exact) and the activations' share of
// the allocator's peak (everything else at the peak: activations, ZeRO-3's gathered layers, comm).
void log_memory(const ZeroMemory& m, int zero_stage, const Allocator& alloc) {
  const double mib = 1024.0 * 1024.0;
  const int64_t peak = static_cast<int64_t>(alloc.stats().peak_bytes);
  log_info("memory per rank (--zero {}): parameters {:.1f} MiB, gradients {:.1f} MiB, optimizer state {:.1f} MiB, "
           "peak activations {:.1f} MiB (allocator peak {:.1f} MiB)",
           zero_stage, m.params / mib, m.grads / mib, m.optimizer / mib, (peak - m.total()) / mib, peak / mib);
}

}  // namespace

TrainSummary run_train(const TrainOptions& o) {
  validate_train_options(o);
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  // Device and precision: ranks share the GPUs round-robin.
  Device device = Device::cpu();
  if (o.device == "cuda" || (o.device == "auto" && cuda_available())) {
    HELIX_CHECK(cuda_available(), "--device cuda: {}", cuda_unavailable_reason());
    device = Device::cuda(world_rank % cuda_device_count());
  }
  // Parallel context (collective; refuses sizes that do not fit the world, naming the flag).
  ParallelOptions par;
  par.sizes = ParallelSizes{.tp = o.tp, .cp = o.cp, .pp = o.pp, .dp = o.dp};
  par.device = device;
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  par.backend = preferred_backend(device, world);
  const ParallelContext ctx = ParallelContext::create(MPI_COMM_WORLD, par);
  set_log_rank(world_rank);
  const bool rank0 = world_rank == 0;
  const int dp = ctx.sizes().dp;
  HELIX_CHECK(o.tokens_per_micro_batch() % dp == 0,
              "--tokens-per-step: expected tokens per micro-batch ({}) divisible by the data-parallel size {}",
              o.tokens_per_micro_batch(), dp);
  HELIX_CHECK(o.zero == 0 || dp > 1, "--zero {}: shards over the data-parallel group, which has 1 rank here (world {} / tp {} / pp {}); "
              "use --zero 0 or more ranks", o.zero, world, o.tp, o.pp);
  const DType compute = o.dtype == "f32" ? DType::kF32
                        : o.dtype == "bf16" ? DType::kBF16
                                            : (device.is_cuda() ? DType::kBF16 : DType::kF32);
  const Stream stream = device.is_cuda() ? Stream::cuda_default(device.index) : Stream();

  // Data.
  FastaOptions fasta;
  fasta.skip_bad_records = o.skip_bad_records;
  auto data = std::make_shared<ProteinDataset>(ProteinDataset::from_fasta(o.data, fasta));
  SplitOptions split{.validation_fraction = o.valid_fraction, .split_seed = 0};
  std::vector<int64_t> train_idx = split_indices(*data, Split::kTrain, split);
  std::vector<int64_t> valid_idx = split_indices(*data, Split::kValidation, split);
  HELIX_CHECK(!train_idx.empty(), "--data '{}': no proteins left for training after the validation split", o.data);
  DataLoaderOptions lo;
  lo.seed = o.seed;
  lo.packing.tokens_per_batch = o.tokens_per_micro_batch() / dp;
  lo.packing.pad_to_multiple = o.pad_to_multiple;
  lo.packing.max_residues = o.max_residues;
  DataLoaderOptions to_opts = lo;
  to_opts.rank = ctx.coords().dp;  // tp ranks of one dp group read the same batches
  to_opts.world_size = dp;
  DataLoader train(data, train_idx, to_opts);
  DataLoaderOptions vo = lo;
  vo.shuffle = false;
  std::unique_ptr<DataLoader> valid;
  if (!valid_idx.empty()) valid = std::make_unique<DataLoader>(data, valid_idx, vo);
  int64_t skipped_records = 0;
  for (int64_t n : data->fasta_stats().skipped) skipped_records += n;
  if (skipped_records > 0 && rank0) log_warn("--data '{}': skipped {} malformed records", o.data, skipped_records);
  if (rank0) log_info("data: {} proteins ({} residues) from '{}', {} train / {} validation", data->size(),
           data->total_residues(), o.data, train_idx.size(), valid_idx.size());

  // Model and optimizer.
  Esm2Options mo;
  mo.device = device;
  mo.compute = compute;
  mo.recompute = o.recompute == "full" ? RecomputePolicy::kFull : RecomputePolicy::kNone;
  mo.parallel = &ctx;
  mo.cp = CpOptions{.comm = parse_cp_comm(o.cp_comm), .split_min_len = o.cp_split_min_len};
  mo.sequence_parallel = o.sequence_parallel;
  mo.layer_ranges = pipeline_stage_ranges(o, ctx);  // --pp > 1: this stage's layers
  const std::unique_ptr<Fp8ScalingManager> fp8 = make_fp8_manager(o, ctx, device, rank0);  // --fp8
  mo.fp8 = fp8.get();
  Esm2Model model(o.model_config, mo);
  model.init_random(o.seed);
  std::unique_ptr<Esm2Pipeline> pipeline = make_train_pipeline(o, model, ctx, lo.packing.tokens_per_batch);
  const AdamWConfig adam_cfg{.beta1 = o.beta1, .beta2 = o.beta2, .eps = o.adam_eps,
                             .weight_decay = o.weight_decay, .clip_norm = o.clip_norm};
  // --zero 1..3: optimizer state (and gradients, and parameters) sharded over dp (docs/fsdp.md);
  // ZeroSync and ZeroAdamW then stand in for GradSync's dp side and AdamW.
  std::unique_ptr<ZeroSync> zero;
  std::unique_ptr<ZeroAdamW> zero_opt;
  if (o.zero > 0) {
    ZeroOptions zo;
    zo.stage = o.zero;
    if (o.cp > 1) zo.shard_comm = &ctx.dp_cp();  // CP: gradients summed (and state sharded) over dp x cp
    zo.regather_in_backward = mo.recompute == RecomputePolicy::kFull;
    zero = std::make_unique<ZeroSync>(model, ctx, zo);
    zero_opt = std::make_unique<ZeroAdamW>(*zero, adam_cfg);
    if (pipeline) pipeline->set_zero(zero.get());  // --pp: sharded over each stage's dp group
  }
  std::optional<AdamW> opt;
  if (!zero) opt.emplace(model.params(), adam_cfg);
  GradSync sync(model.params(), zero ? nullptr : &ctx);
  // --resume / --save: launch/checkpoint.h (restores parameters, moments, step, data cursor).
  Checkpointer ckpt(CheckpointerParams{.ctx = &ctx, .model = &model, .optimizer = opt ? &*opt : nullptr,
                                       .zero = zero.get(), .zero_optimizer = zero_opt.get(), .train = &train,
                                       .options = &o});
  if (fp8) {  // FP8 scaling state (docs/fp8.md): identical on every rank of the amax group
    // --pp > 1: each stage holds its own layers' histories (amax group within a stage): per rank.
    const bool whole_world = o.pp == 1 && (o.fp8_amax_group == "tp-cp-dp" || ctx.world_size() == o.tp);
    const Reshard r = whole_world ? Reshard::kAny : Reshard::kSameLayout;
    ckpt.add_state(ExtraState{.name = "fp8/amax_history", .tensor = fp8->history(), .reshard = r});
    ckpt.add_state(ExtraState{.name = "fp8/scale", .tensor = fp8->scales(), .reshard = r});
    ckpt.add_state(ExtraState{.name = "fp8/scale_inv", .tensor = fp8->scale_invs(), .reshard = r});
  }
  const TrainProgress start = ckpt.resume(o.checkpoint);
  if (rank0)
    log_info("model {}: {} layers, hidden {}, {} heads, {:.2f}M parameters on {} ({}); {} ranks: tp {}{} x cp {} x pp {} x dp {}, "
             "backend {}",
             o.model_config.name, o.model_config.layers, o.model_config.hidden, o.model_config.heads,
             o.model_config.num_params() / 1e6, device.str(), dtype_name(compute), world, o.tp,
             o.sequence_parallel ? " (sequence parallel)" : "", o.cp, o.pp, dp,
             ctx.backend() == CommBackend::kNccl ? "nccl" : "mpi");
  if (rank0 && pipeline) log_info("{}", describe_pipeline(o));

  MetricsWriter metrics;
  if (!o.out.empty() && rank0) {
    std::filesystem::create_directories(o.out);
    metrics = MetricsWriter(o.out + "/metrics.jsonl", /*append=*/start.step > 0);
  }
  double peak = 0;
  if (device.is_cuda()) {
    peak = device_peak_bf16_flops(cuda_compute_capability(device.index), cuda_sm_count(device.index));
  }

  TrainSummary summary;
  summary.valid_loss = std::nan("");
  summary.skipped = start.skipped;
  Allocator& alloc = allocator_for(device);
  for (int64_t step = start.step; step < o.last_step(); ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<PackedBatch> micro;
    int64_t labels = 0, tokens = 0;
    std::vector<int> seqlens;
    for (int m = 0; m < o.micro_batches; ++m) {
      micro.push_back(train.next());
      labels += micro.back().num_labels;
      tokens += micro.back().num_tokens;
      const std::vector<int> s = seqlens_of(micro.back());
      seqlens.insert(seqlens.end(), s.begin(), s.end());
    }
    // Labelled and padded tokens of the global batch (summed over dp): the gradient of the step's
    // mean loss needs 1 / global labelled tokens on every rank.
    // ZeRO under CP sums over dp x cp, and the cp ranks of a dp group read the same global batch:
    // only cp rank 0 counts it.
    if (zero && o.cp > 1 && ctx.coords().cp != 0) labels = tokens = 0;
    Tensor counts = Tensor::from_vector<int64_t>({labels, tokens}, Shape{2});
    zero ? zero->sum_over_dp(counts, Stream()) : sync.sum_over_dp(counts, Stream());
    labels = counts.to_vector<int64_t>()[0];
    tokens = counts.to_vector<int64_t>()[1];
    zero ? zero->zero_grads(stream) : sync.zero_grads(stream);
    const float grad_scale = labels > 0 ? 1.0f / static_cast<float>(labels) : 0.0f;
    double loss_sum = 0;
    if (pipeline) {  // every stage runs the same micro-batches through the schedule
      std::vector<ThdBatch> mbs;
      for (const PackedBatch& p : micro) mbs.push_back(to_thd_batch(p, device));
      loss_sum = pipeline->train_step(mbs, grad_scale, stream);
    }
    for (size_t m = 0; !pipeline && m < micro.size(); ++m) {
      const ThdBatch b = to_thd_batch(micro[m], device);
      TapeOptions to;
      to.stream = stream;
      to.recompute = mo.recompute;
      // dp > 1: the last micro-batch's backward launches the gradient buckets as they become final
      // (earlier micro-batches still accumulate); sync.reduce() waits for them.
      if (m + 1 == micro.size()) to.on_grad_ready = sync.ready_hook(stream);
      if (zero) zero->begin_micro_batch(m + 1 == micro.size());  // ZeRO-3 reduces during the last
      Tape tape(to);
      // Context parallelism: every cp rank read the same global micro-batch and keeps its shard.
      std::unique_ptr<CpBatch> cpb;
      if (o.cp > 1) {
        const CpShardOptions so{.split_min_len = o.cp_split_min_len, .pad_id = o.model_config.pad_token_id};
        cpb = std::make_unique<CpBatch>(cp_split_batch(to_thd_batch(micro[m], Device::cpu()), o.cp, ctx.coords().cp, so));
        cpb->global = b;  // already on the device
        cpb->local = cpb->local.to(device);
      }
      Var logits = model.forward(tape, cpb ? cpb->local : b, cpb.get());
      Var loss = model.loss(tape, logits, cpb ? cpb->local : b, grad_scale);
      tape.backward(loss);
      // cp ranks hold other labels (ZeRO's sum_over_dp below runs over dp x cp already).
      if (cpb && !zero) ctx.cp().all_reduce(loss.data(), ReduceOp::kSum, stream);
      loss_sum += loss.data().to_floats()[0];
    }
    zero ? zero->reduce(stream) : sync.reduce(stream);
    if (fp8) fp8->update(stream);  // one amax all-reduce; scales for the next step (docs/fp8.md)
    Tensor loss_t = Tensor::from_vector<double>({loss_sum}, Shape{1});
    zero ? zero->sum_over_dp(loss_t, Stream()) : sync.sum_over_dp(loss_t, Stream());
    loss_sum = loss_t.to_vector<double>()[0];
    const double mean_loss = labels > 0 ? loss_sum / double(labels) : std::nan("");
    const double lr = o.lr.at(step);
    const OptimizerStepResult r =
        zero ? zero_opt->step(lr, std::isfinite(mean_loss), stream)
             : opt->step(lr, std::isfinite(mean_loss), stream,
                         pipeline ? pipeline->norm_reduce(sync.norm_reduce()) : sync.norm_reduce());
    stream.synchronize();
    if (step == 0 && rank0) log_memory(zero ? zero->memory() : unsharded_memory(model.params(), *opt), o.zero, alloc);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    StepMetrics m;
    m.step = step + 1;
    m.loss = mean_loss;
    m.grad_norm = r.grad_norm;
    m.lr = lr;
    m.tokens = tokens;
    m.step_seconds = secs;
    m.model_flops = o.model_config.train_flops(seqlens) * dp / world;  // this rank's share (seqlens: its dp shard)
    m.peak_flops = peak;
    m.mem_current = static_cast<int64_t>(alloc.stats().current_bytes);
    m.mem_peak = static_cast<int64_t>(alloc.stats().peak_bytes);
    m.skipped = !r.applied;
    summary.skipped += m.skipped;
    m.skipped_total = summary.skipped;
    if (rank0) metrics.write(m);
    if (step == start.step) summary.first_loss = mean_loss;
    summary.last_loss = mean_loss;
    summary.steps = step + 1;
    if (m.skipped && rank0) log_warn("step {}: non-finite loss or gradient, update skipped ({} so far)", m.step, m.skipped_total);
    if (rank0 && ((step + 1) % o.log_interval == 0 || step == 0 || step + 1 == o.steps)) log_info("{}", progress_line(m, o.steps));
    ckpt.after_step(o.checkpoint, step + 1, o.last_step(), summary.skipped);

    const bool last = step + 1 == o.steps;
    if (valid && o.eval_batches > 0 && ((o.eval_interval > 0 && (step + 1) % o.eval_interval == 0) || last)) {
      EvalMetrics e;
      e.step = step + 1;
      e.loss = evaluate(model, *valid, o.eval_batches, stream, &e.tokens, pipeline.get());
      summary.valid_loss = e.loss;
      if (rank0) metrics.write(e);
      if (rank0) log_info("validation at step {}: loss {:.4f} perplexity {:.3f} over {} masked tokens", e.step, e.loss,
               e.perplexity(), e.tokens);
    }
  }
  if (!o.out.empty()) {
    if (zero) zero->materialize_masters();  // collective over dp: full masters for the export
    if (pipeline) pipeline->save_hf(o.out + "/model.safetensors");  // collective over tp and pp
    else model.save_hf(o.out + "/model.safetensors");  // collective over tp; world rank 0 writes
  }
  if (!o.out.empty() && rank0) {
    write_file_atomic(o.out + "/config.json", [&](std::ofstream& f) { f << hf_config(o.model_config).dump(2) << "\n"; });
    log_info("wrote {}/model.safetensors and config.json (Hugging Face EsmForMaskedLM layout)", o.out);
  }
  return summary;
}

}  // namespace helix
