#include "launch/convert.h"

#include <boost/program_options.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "launch/checkpoint.h"
#include "launch/data/loader.h"
#include "layers/esm2.h"
#include "parallel/context.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace helix {
namespace {

constexpr const char* kHfPrefix = "hf:";

bool is_hf(const std::string& spec) { return spec.starts_with(kHfPrefix); }
std::string hf_path(const std::string& spec) { return spec.substr(3); }

Json read_json_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  HELIX_CHECK(f.good(), "'{}': cannot open", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return Json::parse(ss.str(), path);
}

// The model shape of a source: a helix checkpoint's meta.json, or for hf:FILE the config.json
// beside FILE (else the --model preset).
ModelConfig source_config(const std::string& spec, const std::string& preset,
                          const std::string& flag) {
  if (!is_hf(spec)) {
    const std::string dir = resolve_checkpoint(spec, flag);
    const Json meta = read_checkpoint_meta(dir);
    return model_config_from_json(meta.at("model"), dir + "/meta.json");
  }
  const std::string file = hf_path(spec);
  HELIX_CHECK(fs::is_regular_file(file), "{} '{}': no such file", flag, file);
  const std::string cfg = (fs::path(file).parent_path() / "config.json").string();
  ModelConfig c;
  if (fs::exists(cfg)) {
    c = model_config_from_hf(read_json_file(cfg), cfg);
  } else {
    HELIX_CHECK(!preset.empty(),
                "{} '{}': no config.json beside the file; name the shape with --model", flag, file);
    c = model_config(preset);
  }
  const SafetensorsReader r(file);
  if (r.metadata().count("helix_model")) c.name = r.metadata().at("helix_model");
  return c;
}

// Fills `model` from the source (collective for checkpoints).
void load_source(const std::string& spec, Esm2Model& model, const ParallelContext& ctx,
                 const std::string& flag) {
  if (is_hf(spec)) {
    model.load_hf(SafetensorsReader(hf_path(spec)));
    return;
  }
  Checkpointer(CheckpointerParams{.ctx = &ctx, .model = &model}).load(spec, flag);
}

ParallelContext make_context(int tp, Device device) {
  ParallelOptions par;
  par.sizes = ParallelSizes{.tp = tp};
  par.device = device;
  par.backend = CommBackend::kMpi;
  return ParallelContext::create(MPI_COMM_WORLD, par);
}

int world_size() {
  int w = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &w);
  return w;
}

}  // namespace

int run_convert(const std::vector<std::string>& args) {
  std::string from, to, preset;
  po::options_description d("helix convert options");
  d.add_options()("help,h", "show this help")(
      "from", po::value(&from),
      "hf:FILE.safetensors (Hugging Face EsmForMaskedLM) or a helix checkpoint / run directory")(
      "to", po::value(&to),
      "a new helix run directory, or hf:OUTDIR (model.safetensors + config.json)")(
      "model", po::value(&preset), "model preset when hf:FILE has no config.json beside it");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(d).run(), vm);
  if (vm.count("help")) {
    std::cout << "usage: helix convert --from hf:FILE.safetensors --to DIR\n"
                 "       helix convert --from DIR --to hf:OUTDIR\n\n"
              << d;
    return 0;
  }
  po::notify(vm);
  HELIX_CHECK(!from.empty() && !to.empty(), "helix convert: expected --from and --to, got {}{}",
              from.empty() ? "no --from" : "--from", to.empty() ? " and no --to" : "");
  HELIX_CHECK(world_size() == 1, "helix convert: runs on one process, got {} ranks", world_size());
  HELIX_CHECK(is_hf(from) != is_hf(to),
              "helix convert: expected one side hf:..., the other a helix directory, got "
              "--from '{}' --to '{}'",
              from, to);
  const ModelConfig config = source_config(from, preset, "--from");
  const ParallelContext ctx = make_context(1, Device::cpu());
  Esm2Options mo;
  mo.device = Device::cpu();
  mo.parallel = &ctx;
  Esm2Model model(config, mo);
  if (is_hf(from)) {
    const std::vector<CheckpointDir> existing = list_checkpoints(to);
    HELIX_CHECK(existing.empty(),
                "--to '{}': already holds checkpoints (step {}); choose a new directory", to,
                existing.empty() ? 0 : existing.back().step);
    load_source(from, model, ctx, "--from");
    const std::string dir =
        Checkpointer(CheckpointerParams{.ctx = &ctx, .model = &model}).save(to, 0, 0);
    log_info("converted {} -> {} (helix checkpoint, weights only)", hf_path(from), dir);
    return 0;
  }
  load_source(from, model, ctx, "--from");
  const std::string out = hf_path(to);
  fs::create_directories(out);
  model.save_hf(out + "/model.safetensors");
  write_file_atomic(out + "/config.json",
                    [&](std::ofstream& f) { f << hf_config(config).dump(2) << "\n"; });
  log_info("converted {} -> {}/model.safetensors and config.json (Hugging Face EsmForMaskedLM)",
           from, out);
  return 0;
}

namespace {

struct EvalOptions {
  std::string load, data, preset, device = "auto", dtype = "auto", dump;
  int tp = 1;
  int64_t tokens_per_batch = 16384, max_residues = 1022, batches = 0;  // batches 0: all
  uint64_t seed = 1;
};

// Returns false when --help was printed.
bool parse_eval_options(const std::vector<std::string>& args, EvalOptions& e) {
  po::options_description d("helix eval options");
  d.add_options()("help,h", "show this help")(
      "load", po::value(&e.load), "helix checkpoint / run directory, or hf:FILE.safetensors")(
      "data", po::value(&e.data),
      "FASTA or FASTA.gz file (every protein is evaluated, file order)")(
      "model", po::value(&e.preset), "model preset when hf:FILE has no config.json beside it")(
      "seed", po::value(&e.seed)->default_value(e.seed),
      "seed of the crops and the MLM masking (deterministic)")(
      "tokens-per-batch", po::value(&e.tokens_per_batch)->default_value(e.tokens_per_batch),
      "tokens per batch")("max-residues", po::value(&e.max_residues)->default_value(e.max_residues),
                          "crop length")("batches", po::value(&e.batches)->default_value(e.batches),
                                         "evaluate only the first N batches (0: all)")(
      "tp", po::value(&e.tp)->default_value(e.tp),
      "tensor-parallel size (the rest of the ranks split the batches)")(
      "device", po::value(&e.device)->default_value(e.device), "auto | cpu | cuda")(
      "dtype", po::value(&e.dtype)->default_value(e.dtype),
      "auto (bf16 on CUDA, f32 on CPU) | f32 | bf16")(
      "dump-logits", po::value(&e.dump),
      "write batch 0's tokens, cu_seqlens, labels and logits here (safetensors; --tp 1)");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(d).run(), vm);
  if (vm.count("help")) {
    std::cout << "usage: helix eval --load DIR --data FASTA [options]\n\n" << d;
    return false;
  }
  po::notify(vm);
  HELIX_CHECK(!e.load.empty(), "--load: a checkpoint directory or hf:FILE is required");
  HELIX_CHECK(!e.data.empty(), "--data: a FASTA file is required");
  HELIX_CHECK(e.batches >= 0, "--batches: expected >= 0, got {}", e.batches);
  HELIX_CHECK(e.device == "auto" || e.device == "cpu" || e.device == "cuda",
              "--device: expected auto, cpu or cuda, got '{}'", e.device);
  HELIX_CHECK(e.dtype == "auto" || e.dtype == "f32" || e.dtype == "bf16",
              "--dtype: expected auto, f32 or bf16, got '{}'", e.dtype);
  HELIX_CHECK(e.dump.empty() || e.tp == 1,
              "--dump-logits: needs --tp 1 (the logits are whole there), got --tp {}", e.tp);
  return true;
}

struct EvalSums {
  double loss = 0;    // summed over labelled tokens
  double labels = 0;  // labelled tokens
};

// This dp rank's share of the first n batches (i = dp rank, + dp, ...); batch 0's logits to
// e.dump when asked.
EvalSums eval_batches(Esm2Model& model, const DataLoader& loader, int64_t n, const EvalOptions& e,
                      const ParallelContext& ctx) {
  const Device device = model.options().device;
  const Stream stream = device.is_cuda() ? Stream::cuda_default(device.index) : Stream();
  EvalSums sums;
  for (int64_t i = ctx.coords().dp; i < n; i += ctx.sizes().dp) {
    const PackedBatch pb = loader.batch(0, i);
    const ThdBatch b = to_thd_batch(pb, device);
    TapeOptions o;
    o.stream = stream;
    o.record = false;
    Tape tape(o);
    Var logits = model.forward(tape, b);
    Var loss = model.loss(tape, logits, b, 1.0f);
    sums.loss += loss.data().to_floats()[0];
    sums.labels += static_cast<double>(pb.num_labels);
    if (i == 0 && !e.dump.empty() && ctx.world_rank() == 0) {
      const std::vector<std::pair<std::string, Tensor>> tensors = {
          {"tokens", pb.tokens},
          {"labels", pb.labels},
          {"cu_seqlens", pb.cu_seqlens},
          {"logits", logits.data().to(Device::cpu()).to(DType::kF32)}};
      save_safetensors(
          e.dump, tensors,
          {{"source", e.load}, {"dtype", std::string(dtype_name(model.options().compute))}});
    }
  }
  return sums;
}

}  // namespace

int run_eval(const std::vector<std::string>& args) {
  EvalOptions e;
  if (!parse_eval_options(args, e)) return 0;
  const ModelConfig config = source_config(e.load, e.preset, "--load");
  HELIX_CHECK(e.max_residues + 2 <= config.max_positions,
              "--max-residues {} + 2 exceeds the model's {} positions", e.max_residues,
              config.max_positions);
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  Device device = Device::cpu();
  if (e.device == "cuda" || (e.device == "auto" && cuda_available())) {
    HELIX_CHECK(cuda_available(), "--device cuda: {}", cuda_unavailable_reason());
    device = Device::cuda(world_rank % cuda_device_count());
  }
  const ParallelContext ctx = make_context(e.tp, device);
  set_log_rank(world_rank);
  Esm2Options mo;
  mo.device = device;
  mo.compute = e.dtype == "f32"    ? DType::kF32
               : e.dtype == "bf16" ? DType::kBF16
                                   : (device.is_cuda() ? DType::kBF16 : DType::kF32);
  mo.parallel = &ctx;
  Esm2Model model(config, mo);
  load_source(e.load, model, ctx, "--load");

  auto dataset = std::make_shared<ProteinDataset>(ProteinDataset::from_fasta(e.data));
  HELIX_CHECK(dataset->size() > 0, "--data '{}': no proteins", e.data);
  std::vector<int64_t> all(static_cast<size_t>(dataset->size()));
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  DataLoaderOptions lo;
  lo.seed = e.seed;
  lo.shuffle = false;
  lo.packing.tokens_per_batch = e.tokens_per_batch;
  lo.packing.max_residues = e.max_residues;
  const DataLoader loader(dataset, all, lo);
  const int64_t n =
      e.batches > 0 ? std::min(e.batches, loader.num_batches(0)) : loader.num_batches(0);
  const EvalSums sums = eval_batches(model, loader, n, e, ctx);
  Tensor t = Tensor::from_vector<double>({sums.loss, sums.labels}, Shape{2});
  ctx.dp().all_reduce(t, ReduceOp::kSum, Stream());
  const std::vector<double> s = t.to_vector<double>();
  const double loss = s[1] > 0 ? s[0] / s[1] : std::nan("");
  if (world_rank == 0)
    std::cout << fmt::format(
        "eval {}: {} batches, {} masked tokens (seed {}): loss {:.6f} perplexity {:.4f}\n", e.load,
        n, static_cast<int64_t>(s[1]), e.seed, loss, std::exp(loss));
  return std::isfinite(loss) ? 0 : 1;
}

}  // namespace helix
