#include "launch/plan/plan_cli.h"

#include <boost/program_options.hpp>
#include <cctype>
#include <filesystem>
#include <iostream>

#include "core/error.h"
#include "core/json.h"
#include "core/log.h"
#include "launch/plan/pipeline_schedule.h"
#include "launch/plan/search.h"
#include "launch/pipeline_step.h"

namespace po = boost::program_options;

namespace helix {
namespace {

constexpr double kGiB = double(1ull << 30);

// "16384", "16k", "4M", "1G": binary multiples (k = 1024).
int64_t parse_tokens(const std::string& s) {
  HELIX_CHECK(!s.empty(), "--tokens-per-step: expected a number like 16384, 16k or 4M, got ''");
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (...) {
    HELIX_FAIL("--tokens-per-step: expected a number like 16384, 16k or 4M, got '{}'", s);
  }
  const std::string suffix = s.substr(pos);
  double mult = 1;
  if (suffix == "k" || suffix == "K")
    mult = 1024;
  else if (suffix == "M" || suffix == "m")
    mult = 1024.0 * 1024;
  else if (suffix == "G" || suffix == "g")
    mult = 1024.0 * 1024 * 1024;
  else
    HELIX_CHECK(suffix.empty(),
                "--tokens-per-step: unknown suffix '{}' in '{}' (expected k, M or G)", suffix, s);
  HELIX_CHECK(v > 0, "--tokens-per-step: expected > 0, got '{}'", s);
  return static_cast<int64_t>(v * mult);
}

// --gpu NAME -> examples/calibration/NAME.json, looked up from the working directory, then from the
// executable's folder upwards (a build folder inside the source tree).
std::string find_calibration(const std::string& gpu) {
  namespace fs = std::filesystem;
  const std::string rel = "examples/calibration/" + gpu + ".json";
  if (fs::exists(rel)) return rel;
  std::error_code ec;
  fs::path dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
  for (int i = 0; i < 4 && !ec && !dir.empty(); ++i, dir = dir.parent_path())
    if (fs::exists(dir / rel)) return (dir / rel).string();
  HELIX_FAIL("--gpu {}: no calibration file {} (give --calibration FILE)", gpu, rel);
}

RecomputeMode parse_recompute(const std::string& s) {
  if (s == "none") return RecomputeMode::kNone;
  if (s == "selective") return RecomputeMode::kSelective;
  if (s == "full") return RecomputeMode::kFull;
  HELIX_FAIL("--recompute: expected none, selective or full, got '{}'", s);
}

std::string gib(double b) { return fmt::format("{:.2f} GiB", b / kGiB); }

void print_plan(const PlanInput& in, const PlanResult& r, const Calibration& cal) {
  const ModelConfig& m = in.model;
  const PlanLayout& l = in.layout;
  fmt::print("model {}: {} layers, hidden {}, {} heads, ffn {}; {:.3f}B parameters\n", m.name,
             m.layers, m.hidden, m.heads, m.ffn, double(m.num_params()) / 1e9);
  fmt::print(
      "layout: {} GPUs = tp {} x cp {} x pp {} x dp {}; {} virtual stage(s) per rank; zero {}; "
      "{} micro-batches of {} tokens per dp rank; recompute {}; fp8 {}; sequence parallel {}\n",
      in.gpus, l.tp, l.cp, l.pp, r.dp, l.virtual_stages, l.zero, l.micro_batches,
      r.tokens_per_micro_batch, recompute_name(l.recompute),
      in.fp8 == Fp8Mode::kDelayed ? "delayed" : "off",
      l.tp > 1 && l.sequence_parallel ? "on" : "off");
  fmt::print("calibration: {} ({}); groups on: {}\n", cal.name, cal.path, r.comm_placement);
  for (const std::string& w : r.warnings) fmt::print("note: {}\n", w);
  fmt::print("\nmemory per rank (stage {} of {}, {} layers{}{}):\n", r.worst_stage, l.pp,
             r.stages[r.worst_stage].layers, r.stages[r.worst_stage].first ? ", embedding" : "",
             r.stages[r.worst_stage].last ? ", LM head" : "");
  const MemoryBytes& mem = r.memory;
  fmt::print("  parameters (fp32 master)   {:>12}\n", gib(mem.master));
  fmt::print("  parameters (model copy)    {:>12}\n", gib(mem.model_copy));
  fmt::print("  gradients (fp32)           {:>12}\n", gib(mem.grads));
  fmt::print("  optimizer state (AdamW)    {:>12}\n", gib(mem.optimizer));
  fmt::print("  activations                {:>12}\n", gib(mem.activations));
  fmt::print("  communication buffers      {:>12}\n", gib(mem.comm_buffers));
  fmt::print("  backward workspace         {:>12}\n", gib(mem.workspace));
  fmt::print("  runtime reserved           {:>12}\n", gib(r.reserved_bytes));
  fmt::print("  total                      {:>12}  of {}: {}\n",
             gib(mem.total() + r.reserved_bytes), gib(r.capacity_bytes),
             r.fits ? "fits" : "DOES NOT FIT");
  fmt::print("\nper step: {:.3e} model FLOPs, {:.3e} hardware FLOPs (with recompute)\n",
             r.model_flops, r.hardware_flops);
  fmt::print("bytes each rank receives per step: tp {}, cp {}, dp {}, pp {}\n", gib(r.comm.tp),
             gib(r.comm.cp), gib(r.comm.dp), gib(r.comm.pp));
  fmt::print("pipeline bubble: (p-1)/(v*m+p-1) = {:.1f}%\n", 100 * r.bubble_fraction);
  const StepTime& t = r.time;
  fmt::print(
      "\npredicted step time {:.3f} s: pipeline {:.3f} s (bubble {:.3f} s) + exposed dp {:.3f} s + "
      "optimizer {:.3f} s + host {:.4f} s\n",
      t.total, t.pipeline, t.bubble, t.dp_exposed, t.optimizer, t.host);
  fmt::print(
      "  one micro-batch on the slowest stage: gemm {:.2f} ms, attention {:.2f} ms, memory-bound "
      "{:.2f} ms, "
      "tp {:.2f} ms, cp {:.2f} ms, pp {:.2f} ms\n",
      1e3 * t.gemm, 1e3 * t.attention, 1e3 * t.memory_bound, 1e3 * t.tp_comm, 1e3 * t.cp_comm,
      1e3 * t.pp_comm);
  if (r.layer_factor != 1)
    fmt::print(
        "  layer compute scaled by {:.3f}: a measured layer of this shape in the calibration\n",
        r.layer_factor);
  fmt::print("predicted throughput {:.0f} tokens/s, MFU {:.1f}% (of {:.0f} TFLOP/s per GPU)\n",
             r.tokens_per_second, 100 * r.mfu, cal.bf16_peak_tflops);
}

Json plan_json(const PlanInput& in, const PlanResult& r) {
  Json::Object o;
  const PlanLayout& l = in.layout;
  o["model"] = in.model.name;
  o["gpus"] = in.gpus;
  o["tokens_per_step"] = in.tokens_per_step;
  o["tp"] = l.tp;
  o["cp"] = l.cp;
  o["pp"] = l.pp;
  o["dp"] = r.dp;
  o["virtual_stages"] = l.virtual_stages;
  o["zero"] = l.zero;
  o["micro_batches"] = l.micro_batches;
  o["recompute"] = recompute_name(l.recompute);
  o["fp8"] = in.fp8 == Fp8Mode::kDelayed ? "delayed" : "off";
  o["memory_gib"] = (r.memory.total() + r.reserved_bytes) / kGiB;
  o["fits"] = r.fits;
  o["bubble"] = r.bubble_fraction;
  o["step_seconds"] = r.time.total;
  o["tokens_per_second"] = r.tokens_per_second;
  o["mfu"] = r.mfu;
  o["model_flops"] = r.model_flops;
  return Json(std::move(o));
}

}  // namespace

int cmd_plan(const std::vector<std::string>& args) {
  po::options_description desc("helix plan options");
  std::string model = "esm2-650m", gpu = "h100", calibration, tokens = "16384", fp8 = "off",
              recompute = "none", sp = "on", rejected = "30";
  std::vector<std::string> extra;
  std::string pp_layers;
  int layers = 0, hidden = 0, heads = 0, ffn = 0, gpus = 1, gpus_per_node = 0, top = 10;
  double seq_len = 504, max_bubble = 0.5;
  int max_seq_len = 1024;
  PlanLayout l;
  // clang-format off
  auto opt = desc.add_options();
  opt("help,h", "show this help");
  opt("model", po::value(&model), "preset (esm2-8m .. esm2-15b, esm3-98b); default esm2-650m");
  opt("layers", po::value(&layers), "override the preset's layers");
  opt("hidden", po::value(&hidden), "override the hidden size");
  opt("heads", po::value(&heads), "override the number of heads");
  opt("ffn", po::value(&ffn), "override the FFN size");
  opt("gpus", po::value(&gpus), "GPUs in the job (default 1)");
  opt("gpu", po::value(&gpu), "GPU type: reads examples/calibration/<gpu>.json (default h100)");
  opt("calibration", po::value(&calibration), "calibration file (instead of --gpu)");
  opt("calibration-extra", po::value(&extra), "measured rows to merge (repeatable), e.g. "
      "helix_bench_layer_slice's output");
  opt("gpus-per-node", po::value(&gpus_per_node), "GPUs per node (default: the calibration's, 8)");
  opt("tp", po::value(&l.tp), "tensor parallel size");
  opt("cp", po::value(&l.cp), "context parallel size");
  opt("pp", po::value(&l.pp), "pipeline stages");
  opt("pp-virtual", po::value(&l.virtual_stages), "model chunks per pipeline rank (interleaved 1F1B)");
  opt("pp-layers", po::value(&pp_layers), "layers per virtual stage, e.g. 9,8,8,8 (as helix train "
      "--pp-layers; default: the trainer's balanced split)");
  opt("zero", po::value(&l.zero), "0 | 1 (optimizer state) | 2 (+ gradients) | 3 (+ parameters)");
  opt("micro-batches", po::value(&l.micro_batches), "micro-batches per step and dp rank");
  opt("tokens-per-step", po::value(&tokens), "tokens per optimizer step: 16384, 16k, 4M (k = 1024)");
  opt("fp8", po::value(&fp8), "none (= off) | delayed, as helix train");
  opt("recompute", po::value(&recompute), "none | selective | full");
  opt("sequence-parallel", po::value(&sp), "on | off (with tp > 1; default on)");
  opt("seq-len", po::value(&seq_len), "token-weighted mean sequence length sum(s^2)/sum(s) "
      "(default 504: Swiss-Prot crops to 1022 residues)");
  opt("max-seq-len", po::value(&max_seq_len), "longest sample in tokens (default 1024)");
  opt("search", "enumerate layouts (tp, cp, pp, virtual, zero, micro-batches, recompute; the "
      "layout flags above are ignored) and rank the feasible ones");
  opt("top", po::value(&top), "--search: feasible layouts to print (default 10)");
  opt("max-bubble", po::value(&max_bubble), "--search: reject layouts idling more (default 0.5)");
  opt("rejected", po::value(&rejected), "--search: rejected families to print, N or 'all' (30)");
  opt("json", "print JSON lines instead of the report");
  // clang-format on
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).run(), vm);
  po::notify(vm);
  if (vm.count("help")) {
    std::cout
        << "usage: helix plan --model M --gpus N [--tp .. --cp .. --pp .. --zero ..] [--search]\n\n"
        << desc;
    return 0;
  }
  PlanInput in;
  in.model = model_config(model);
  if (layers) in.model.layers = layers;
  if (hidden) in.model.hidden = hidden;
  if (heads) in.model.heads = heads;
  if (ffn) in.model.ffn = ffn;
  if (layers || hidden || heads || ffn) in.model.name += "-custom";
  in.model.validate();
  HELIX_CHECK(gpus >= 1, "--gpus: expected >= 1, got {}", gpus);
  in.gpus = gpus;
  in.tokens_per_step = parse_tokens(tokens);
  // "none" as `helix train --fp8` spells it; "off" kept for existing scripts.
  HELIX_CHECK(fp8 == "none" || fp8 == "off" || fp8 == "delayed",
              "--fp8: expected none (or off) or delayed, got '{}'", fp8);
  if (fp8 == "none") fp8 = "off";  // one spelling in the reports
  in.fp8 = fp8 == "delayed" ? Fp8Mode::kDelayed : Fp8Mode::kOff;
  l.recompute = parse_recompute(recompute);
  HELIX_CHECK(sp == "on" || sp == "off", "--sequence-parallel: expected on or off, got '{}'", sp);
  l.sequence_parallel = sp == "on";
  HELIX_CHECK(seq_len >= 1, "--seq-len: expected >= 1, got {}", seq_len);
  in.seq_len = seq_len;
  in.max_seq_len = max_seq_len;
  in.layout = l;
  if (!pp_layers.empty() && !vm.count("search")) in.pp_layers = parse_pp_layers(pp_layers);

  Calibration cal = load_calibration(calibration.empty() ? find_calibration(gpu) : calibration);
  for (const std::string& e : extra) merge_calibration(cal, load_calibration(e));
  if (gpus_per_node > 0) cal.gpus_per_node = gpus_per_node;
  HELIX_CHECK(
      cal.memory_gib > 0 && cal.bf16_peak_tflops > 0 && cal.nvlink_gbps > 0 && cal.network_gbps > 0,
      "calibration '{}': expected memory_gib, bf16_peak_tflops, nvlink_gbps and network_gbps > 0",
      cal.path);
  const bool json = vm.count("json") > 0;

  if (!vm.count("search")) {
    const PlanResult r = make_plan(in, cal);
    HELIX_CHECK(r.error.empty(), "{}", r.error);
    if (json)
      std::cout << plan_json(in, r).dump() << "\n";
    else
      print_plan(in, r, cal);
    return 0;
  }
  SearchOptions so;
  so.max_bubble = max_bubble;
  const SearchResult s = search_layouts(in, cal, so);
  if (json) {
    for (const SearchCandidate& c : s.feasible) {
      PlanInput ci = in;
      ci.layout = c.layout;
      std::cout << plan_json(ci, c.result).dump() << "\n";
    }
    return 0;
  }
  fmt::print(
      "search: {} on {} GPUs ({}), {} tokens per step, fp8 {}: {} layouts evaluated, {} feasible\n",
      in.model.name, in.gpus, cal.name, in.tokens_per_step, fp8, s.evaluated, s.feasible.size());
  fmt::print("\n{:>4} {:<44} {:>10} {:>8} {:>7} {:>9} {:>13} {:>6}\n", "rank",
             "layout (tp cp pp v zero mb recompute)", "mem GiB", "dp", "bubble", "step s",
             "tokens/s", "MFU");
  for (size_t i = 0; i < s.feasible.size() && int(i) < top; ++i) {
    const SearchCandidate& c = s.feasible[i];
    const PlanResult& r = c.result;
    fmt::print("{:>4} {:<44} {:>10.1f} {:>8} {:>6.1f}% {:>9.3f} {:>13.0f} {:>5.1f}%\n", i + 1,
               c.layout.str(), (r.memory.total() + r.reserved_bytes) / kGiB, r.dp,
               100 * r.bubble_fraction, r.time.total, r.tokens_per_second, 100 * r.mfu);
  }
  const size_t show = rejected == "all" ? s.rejected.size()
                                        : std::min<size_t>(s.rejected.size(), std::stoul(rejected));
  fmt::print(
      "\nrejected layout families (tp cp pp v zero; no micro-batch count or recompute policy "
      "works): {}\n",
      s.rejected.size());
  for (size_t i = 0; i < show; ++i)
    fmt::print("  tp{} cp{} pp{} v{} zero{}: {}\n", s.rejected[i].layout.tp,
               s.rejected[i].layout.cp, s.rejected[i].layout.pp,
               s.rejected[i].layout.virtual_stages, s.rejected[i].layout.zero,
               s.rejected[i].reason);
  if (show < s.rejected.size())
    fmt::print("  ... {} more (--rejected all)\n", s.rejected.size() - show);
  if (s.feasible.empty()) return 1;
  return 0;
}

}  // namespace helix
