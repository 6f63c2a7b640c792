#include "launch/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "launch/data/loader.h"
#include "launch/data/tokenizer.h"
#include "launch/train_options.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "layers/zero_optimizer.h"
#include "layers/zero_sync.h"
#include "parallel/context.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace helix {

// ---- Options ----

po::options_description checkpoint_options_description(CheckpointOptions& o) {
  po::options_description d("Checkpoints");
  d.add_options()("save", po::value(&o.save_dir),
                  "run directory for sharded checkpoints (step_XXXXXXXX/)")(
      "save-every", po::value(&o.save_every)->default_value(o.save_every),
      "steps between checkpoints (0: only at the end of the process)")(
      "keep", po::value(&o.keep)->default_value(o.keep),
      "newest checkpoints kept in --save (0: all)")(
      "resume", po::value(&o.resume),
      "continue from a run directory's newest complete checkpoint (or one checkpoint)")(
      "stop-after", po::value(&o.stop_after)->default_value(o.stop_after),
      "end this process after this global step (0: --steps); the schedule still spans --steps");
  return d;
}

void validate_checkpoint_options(const CheckpointOptions& o, int64_t steps) {
  HELIX_CHECK(o.save_every >= 0, "--save-every: expected >= 0, got {}", o.save_every);
  HELIX_CHECK(o.keep >= 0, "--keep: expected >= 0, got {}", o.keep);
  HELIX_CHECK(o.save_every == 0 || !o.save_dir.empty(), "--save-every {}: needs --save DIR",
              o.save_every);
  HELIX_CHECK(o.keep == 0 || !o.save_dir.empty(), "--keep {}: needs --save DIR", o.keep);
  HELIX_CHECK(o.stop_after >= 0 && o.stop_after <= steps,
              "--stop-after: expected 0..--steps ({}), got {}", steps, o.stop_after);
}

// ---- Model config and vocabulary blocks ----

Json model_config_to_json(const ModelConfig& c) {
  Json j;
  j["name"] = c.name;
  j["layers"] = c.layers;
  j["hidden"] = c.hidden;
  j["heads"] = c.heads;
  j["ffn"] = c.ffn;
  j["vocab"] = c.vocab;
  j["max_positions"] = c.max_positions;
  j["layer_norm_eps"] = double(c.layer_norm_eps);
  j["token_dropout"] = c.token_dropout;
  j["mask_token_id"] = c.mask_token_id;
  j["pad_token_id"] = c.pad_token_id;
  return j;
}

ModelConfig model_config_from_json(const Json& j, const std::string& what) {
  ModelConfig c;
  c.name = j.at("name", what).as_string(what);
  c.layers = static_cast<int>(j.at("layers", what).as_int(what));
  c.hidden = static_cast<int>(j.at("hidden", what).as_int(what));
  c.heads = static_cast<int>(j.at("heads", what).as_int(what));
  c.ffn = static_cast<int>(j.at("ffn", what).as_int(what));
  c.vocab = static_cast<int>(j.at("vocab", what).as_int(what));
  c.max_positions = static_cast<int>(j.at("max_positions", what).as_int(what));
  c.layer_norm_eps = static_cast<float>(j.at("layer_norm_eps", what).as_double(what));
  c.token_dropout = j.at("token_dropout", what).as_bool(what);
  c.mask_token_id = static_cast<int>(j.at("mask_token_id", what).as_int(what));
  c.pad_token_id = static_cast<int>(j.at("pad_token_id", what).as_int(what));
  return c;
}

Json vocabulary_json() {
  Json::Array a;
  for (int32_t i = 0; i < kEsmVocabSize; ++i) a.emplace_back(std::string(esm_token(i)));
  return Json(std::move(a));
}

Json hf_config(const ModelConfig& c) {
  Json j;
  j["architectures"] = Json(Json::Array{Json("EsmForMaskedLM")});
  j["model_type"] = "esm";
  j["vocab_size"] = c.vocab;
  j["hidden_size"] = c.hidden;
  j["num_hidden_layers"] = c.layers;
  j["num_attention_heads"] = c.heads;
  j["intermediate_size"] = c.ffn;
  j["max_position_embeddings"] = c.max_positions;
  j["position_embedding_type"] = "rotary";
  j["layer_norm_eps"] = double(c.layer_norm_eps);
  j["hidden_act"] = "gelu";
  j["hidden_dropout_prob"] = 0.0;
  j["attention_probs_dropout_prob"] = 0.0;
  j["token_dropout"] = c.token_dropout;
  j["emb_layer_norm_before"] = false;
  j["mask_token_id"] = c.mask_token_id;
  j["pad_token_id"] = c.pad_token_id;
  j["tie_word_embeddings"] = true;
  j["initializer_range"] = 0.02;
  return j;
}

ModelConfig model_config_from_hf(const Json& j, const std::string& what) {
  HELIX_CHECK(!j.has("model_type") || j.at("model_type").as_string(what) == "esm",
              "{}: expected model_type \"esm\", got '{}'", what,
              j.at("model_type").as_string(what));
  ModelConfig c;
  c.name = "hf-esm";
  c.layers = static_cast<int>(j.at("num_hidden_layers", what).as_int(what));
  c.hidden = static_cast<int>(j.at("hidden_size", what).as_int(what));
  c.heads = static_cast<int>(j.at("num_attention_heads", what).as_int(what));
  c.ffn = static_cast<int>(j.at("intermediate_size", what).as_int(what));
  c.vocab = static_cast<int>(j.at("vocab_size", what).as_int(what));
  if (j.has("max_position_embeddings"))
    c.max_positions = static_cast<int>(j.at("max_position_embeddings").as_int(what));
  if (j.has("layer_norm_eps"))
    c.layer_norm_eps = static_cast<float>(j.at("layer_norm_eps").as_double(what));
  if (j.has("token_dropout")) c.token_dropout = j.at("token_dropout").as_bool(what);
  if (j.has("mask_token_id") && !j.at("mask_token_id").is_null())
    c.mask_token_id = static_cast<int>(j.at("mask_token_id").as_int(what));
  if (j.has("pad_token_id") && !j.at("pad_token_id").is_null())
    c.pad_token_id = static_cast<int>(j.at("pad_token_id").as_int(what));
  HELIX_CHECK(!j.has("position_embedding_type") ||
                  j.at("position_embedding_type").as_string(what) == "rotary",
              "{}: expected position_embedding_type \"rotary\" (ESM-2), got '{}'", what,
              j.at("position_embedding_type").as_string(what));
  c.validate();
  return c;
}

// ---- Helpers ----

namespace {

std::string rank_file_name(int rank) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "rank_%05d.safetensors", rank);
  return buf;
}

// Test-only fault injection: HELIX_CHECKPOINT_FAULT="<point>:<step>" ends the process at that point
// of the save of that step (points: rank_file = the last rank after writing its file, before_rename
// = rank 0 after writing meta.json). Simulates a job killed in the middle of a save.
void maybe_fault(const char* point, int64_t step, bool this_rank) {
  const char* env = std::getenv("HELIX_CHECKPOINT_FAULT");
  if (!env || !this_rank) return;
  const std::string s = env;
  if (s != std::string(point) + ":" + std::to_string(step)) return;
  log_error("HELIX_CHECKPOINT_FAULT: exiting during the save of step {} ({})", step, point);
  std::_Exit(75);
}

// Every rank's string, in rank order (collective over `comm`).
std::vector<std::string> all_gather_strings(Communicator& comm, const std::string& s) {
  const int n = comm.size();
  Tensor len = Tensor::from_vector<int64_t>({static_cast<int64_t>(s.size())}, Shape{1});
  Tensor lens = all_gather(comm, len, Stream());
  const std::vector<int64_t> l = lens.to_vector<int64_t>();
  const int64_t width = std::max<int64_t>(1, *std::max_element(l.begin(), l.end()));
  Tensor mine = Tensor::zeros({width}, DType::kU8);
  std::copy(s.begin(), s.end(), mine.data<uint8_t>());
  Tensor all = all_gather(comm, mine, Stream());
  std::vector<std::string> out;
  const auto* p = all.data<uint8_t>();
  for (int r = 0; r < n; ++r)
    out.emplace_back(reinterpret_cast<const char*>(p + r * width), static_cast<size_t>(l[r]));
  return out;
}

// One box of a parameter's full tensor held by this tp rank, and the elements [local_begin,
// local_end) of the rank's (row-major) local tensor that hold it.
struct LocalBox {
  TensorPiece box;
  int64_t local_begin = 0, local_end = 0;
};

// The boxes of parameter `p` that tp rank r of n holds, in local memory order. Mirrors the TpShard
// layouts of layers/parameter.h (vocabulary pad rows past the end are not stored).
std::vector<LocalBox> local_boxes(const Parameter& p, int r, int n) {
  std::vector<LocalBox> out;
  const std::vector<int64_t> full = p.full_shape.vec();
  int64_t row = 1;  // elements of one row of dim 0
  for (size_t d = 1; d < full.size(); ++d) row *= full[d];
  const auto box = [&](std::vector<int64_t> off, std::vector<int64_t> shape, int64_t begin) {
    LocalBox b;
    b.box.offsets = std::move(off);
    b.box.shape = std::move(shape);
    b.local_begin = begin;
    b.local_end = begin + b.box.numel();
    out.push_back(std::move(b));
  };
  const std::vector<int64_t> zero(full.size(), 0);
  switch (p.shard) {
    case TpShard::kReplicated:
      box(zero, full, 0);
      break;
    case TpShard::kRows: {
      const int64_t rows = (full[0] + n - 1) / n, lo = std::min(full[0], r * rows),
                    hi = std::min(full[0], (r + 1) * rows);
      if (hi > lo) {
        std::vector<int64_t> off = zero, shape = full;
        off[0] = lo;
        shape[0] = hi - lo;
        box(off, shape, 0);
      }
      break;
    }
    case TpShard::kQkvRows: {  // [q; k; v] rows of this rank's heads
      const int64_t part = full[0] / 3, rows = part / n;
      for (int j = 0; j < 3; ++j) {
        std::vector<int64_t> off = zero, shape = full;
        off[0] = j * part + r * rows;
        shape[0] = rows;
        box(off, shape, j * rows * row);
      }
      break;
    }
    case TpShard::kCols: {
      std::vector<int64_t> off = zero, shape = full;
      shape[1] = full[1] / n;
      off[1] = r * shape[1];
      box(off, shape, 0);
      break;
    }
  }
  return out;
}

// Pieces for elements [begin, end) of the local tensor of `p`, whose values are `data` (1-D CPU,
// end - begin elements): one per box it meets, a flat range where it covers the box only partly
// (ZeRO shards). Returns (piece, stored tensor).
std::vector<std::pair<TensorPiece, Tensor>> range_pieces(const Parameter& p, int r, int n,
                                                         const Tensor& data, int64_t begin,
                                                         int64_t end) {
  std::vector<std::pair<TensorPiece, Tensor>> out;
  for (const LocalBox& b : local_boxes(p, r, n)) {
    const int64_t lo = std::max(begin, b.local_begin), hi = std::min(end, b.local_end);
    if (lo >= hi) continue;
    TensorPiece piece = b.box;
    Tensor t = data.slice(lo - begin, hi - begin);
    if (lo == b.local_begin && hi == b.local_end) {
      t = t.view(Shape(piece.shape));
    } else {
      piece.flat_begin = lo - b.local_begin;
      piece.flat_end = hi - b.local_begin;
    }
    out.emplace_back(std::move(piece), std::move(t));
  }
  return out;
}

// The element ranges of unit u's parameters inside this rank's ZeRO shard: (parameter index,
// [begin, end) of its local tensor, offset of `begin` in the shard).
struct ZeroRange {
  size_t param = 0;
  int64_t begin = 0, end = 0, shard_offset = 0;
};
std::vector<ZeroRange> zero_ranges(const ZeroSync& z, size_t u) {
  std::vector<ZeroRange> out;
  const ZeroUnitLayout& l = z.layout().units[u];
  const int64_t lo = z.shard_comm().rank() * l.shard_numel, hi = lo + l.shard_numel;
  for (size_t k = 0; k < z.unit_params(u).size(); ++k) {
    const int64_t a = std::max(lo, l.offsets[k]), b = std::min(hi, l.offsets[k] + l.numels[k]);
    if (a < b) out.push_back({z.unit_params(u)[k], a - l.offsets[k], b - l.offsets[k], a - lo});
  }
  return out;
}

Json layout_json(const ParallelContext& ctx, bool sequence_parallel, int zero_stage) {
  Json j;
  j["world_size"] = ctx.world_size();
  j["tp"] = ctx.sizes().tp;
  j["cp"] = ctx.sizes().cp;
  j["dp"] = ctx.sizes().dp;
  j["pp"] = ctx.sizes().pp;
  j["sequence_parallel"] = sequence_parallel;
  j["zero"] = zero_stage;
  return j;
}

std::string layout_str(const Json& l) {
  return fmt::format("tp {} x cp {} x dp {} x pp {} ({} ranks)", l.at("tp").as_int(),
                     l.at("cp").as_int(), l.at("dp").as_int(), l.at("pp").as_int(),
                     l.at("world_size").as_int());
}

// The options that decide which batch comes at a cursor position: a resume must use the same.
Json data_plan_json(const TrainOptions& o, const DataLoader& train) {
  Json j;
  j["seed"] = static_cast<int64_t>(o.seed);
  j["tokens_per_rank_batch"] = train.options().packing.tokens_per_batch;
  j["max_residues"] = o.max_residues;
  j["pad_to_multiple"] = o.pad_to_multiple;
  j["valid_fraction"] = o.valid_fraction;
  j["train_proteins"] = train.num_proteins();
  return j;
}

Json schedule_json(const TrainOptions& o) {
  Json j;
  j["peak_lr"] = o.lr.peak_lr;
  j["min_lr"] = o.lr.min_lr;
  j["warmup_steps"] = o.lr.warmup_steps;
  j["total_steps"] = o.lr.total_steps;
  j["decay"] = o.lr.decay == LrDecay::kConstant ? "constant"
               : o.lr.decay == LrDecay::kLinear ? "linear"
                                                : "cosine";
  return j;
}

Json optimizer_json(const AdamWConfig& c) {
  Json j;
  j["beta1"] = c.beta1;
  j["beta2"] = c.beta2;
  j["eps"] = c.eps;
  j["weight_decay"] = c.weight_decay;
  j["clip_norm"] = c.clip_norm;
  return j;
}

}  // namespace

// ---- Checkpointer ----

int64_t Checkpointer::steps_applied() const {
  return p_.zero_optimizer ? p_.zero_optimizer->steps_applied() : p_.optimizer->steps_applied();
}
void Checkpointer::set_steps_applied(int64_t s) {
  if (p_.zero_optimizer) p_.zero_optimizer->set_steps_applied(s);
  if (p_.optimizer) p_.optimizer->set_steps_applied(s);
}
const AdamWConfig& Checkpointer::adam_config() const {
  return p_.zero_optimizer ? p_.zero_optimizer->config() : p_.optimizer->config();
}

Checkpointer::Checkpointer(const CheckpointerParams& p) : p_(p) {
  HELIX_CHECK(p_.ctx && p_.model, "Checkpointer: expected a parallel context and a model");
}

void Checkpointer::add_state(ExtraState s) {
  for (const ExtraState& e : extra_)
    HELIX_CHECK(e.name != s.name, "Checkpointer: state '{}' registered twice", s.name);
  extra_.push_back(std::move(s));
}

// This rank's file contents are built in save(); the record is what rank 0 merges into meta.json.
Json Checkpointer::local_record(const std::string& file, int64_t step, int64_t skipped) const {
  Json j;
  j["file"] = file;
  j["step"] = step;
  j["skipped"] = skipped;
  if (has_optimizer()) j["optimizer_steps_applied"] = steps_applied();
  if (p_.train) {
    j["data_cursor"]["epoch"] = p_.train->cursor().epoch;
    j["data_cursor"]["position"] = p_.train->cursor().position;
  }
  return j;
}

// Writes this rank's file into `tmp` and returns its record (file digest, pieces, trainer state)
// for rank 0's meta.json.
Json Checkpointer::write_rank_file(const std::string& tmp, int64_t step, int64_t skipped) const {
  // This rank's pieces: a tensor part is written by the first replica only (dp 0, cp 0; tp 0 for
  // tensors replicated over tp).
  const ParallelContext& ctx = *p_.ctx;
  const int rank = ctx.world_rank();
  const RankCoords& c = ctx.coords();
  const int tp = p_.model->tp_size(), tr = p_.model->tp_rank();
  const std::string file = rank_file_name(rank);
  std::vector<std::pair<std::string, Tensor>> tensors;
  Json pieces = Json(Json::Object{}), shapes = Json(Json::Object{});
  // Adds one piece of global tensor `tensor` (global shape `full`) held by `t`.
  const auto add = [&](const std::string& tensor, TensorPiece piece, const Tensor& t,
                       const Shape& full, Reshard r) {
    piece.file = file;
    piece.key =
        tensor + "#" + std::to_string(pieces.has(tensor) ? pieces[tensor].as_array().size() : 0);
    tensors.emplace_back(piece.key, t.is_contiguous() ? t : t.clone());
    if (!pieces.has(tensor)) {
      pieces[tensor] = Json(Json::Array{});
      Json::Array dims;
      for (int64_t x : full.vec()) dims.emplace_back(x);
      shapes[tensor]["shape"] = Json(std::move(dims));
      shapes[tensor]["dtype"] = safetensors_dtype(t.dtype());
      shapes[tensor]["reshard"] = r == Reshard::kAny ? "any" : "same_layout";
    }
    pieces[tensor].mutable_array().push_back(piece.to_json());
  };
  std::vector<Parameter>& params = p_.model->params().all();
  // Without ZeRO the first dp replica writes each parameter's whole local tensor; with ZeRO every
  // dp rank writes the parts of its flat shards (flat ranges of the boxes).
  // Pipeline stages hold disjoint layers, except the tied embedding / decoder table, held (and
  // kept bitwise equal) by the first and the last stage: the first stage writes it.
  const auto owns = [&](const Parameter& p) {
    return c.cp == 0 && (p_.zero || c.dp == 0) && (p.shard != TpShard::kReplicated || c.tp == 0) &&
           (c.pp == 0 || p.name != "esm.embeddings.word_embeddings.weight");
  };
  const auto put = [&](const std::string& prefix, const Parameter& p, const Tensor& data,
                       int64_t begin, int64_t end) {
    for (auto& [piece, t] : range_pieces(p, tr, tp, data, begin, end))
      add(prefix + p.name, piece, t, p.full_shape, Reshard::kAny);
  };
  if (!p_.zero) {
    for (size_t i = 0; i < params.size(); ++i) {
      const Parameter& p = params[i];
      if (!owns(p)) continue;
      const auto flat = [](const Tensor& t) { return t.to(Device::cpu()).view(Shape{t.numel()}); };
      put("model/", p, flat(p.master), 0, p.master.numel());
      if (p_.optimizer) {
        put("optim/exp_avg/", p, flat(p_.optimizer->moments()[i].first), 0, p.master.numel());
        put("optim/exp_avg_sq/", p, flat(p_.optimizer->moments()[i].second), 0, p.master.numel());
      }
    }
  } else {
    for (size_t u = 0; u < p_.zero->num_units(); ++u) {
      const Tensor m = p_.zero->master_shard(u).to(Device::cpu());
      const Tensor m1 = p_.zero->exp_avg_shard(u).to(Device::cpu());
      const Tensor m2 = p_.zero->exp_avg_sq_shard(u).to(Device::cpu());
      for (const ZeroRange& z : zero_ranges(*p_.zero, u)) {
        const Parameter& p = params[z.param];
        if (!owns(p)) continue;
        const int64_t len = z.end - z.begin;
        put("model/", p, m.slice(z.shard_offset, z.shard_offset + len), z.begin, z.end);
        put("optim/exp_avg/", p, m1.slice(z.shard_offset, z.shard_offset + len), z.begin, z.end);
        put("optim/exp_avg_sq/", p, m2.slice(z.shard_offset, z.shard_offset + len), z.begin, z.end);
      }
    }
  }
  for (const ExtraState& e : extra_) {
    if (e.reshard == Reshard::kAny && rank != 0) continue;
    const std::string key = e.reshard == Reshard::kAny
                                ? "extra/" + e.name
                                : "extra/" + e.name + "@rank" + std::to_string(rank);
    TensorPiece piece;
    piece.offsets.assign(static_cast<size_t>(e.tensor.ndim()), 0);
    piece.shape = e.tensor.shape().vec();
    add(key, piece, e.tensor.to(Device::cpu()), e.tensor.shape(), e.reshard);
  }
  save_safetensors(tmp + "/" + file, tensors,
                   {{"format", kCheckpointFormat},
                    {"step", std::to_string(step)},
                    {"rank", std::to_string(rank)}});
  maybe_fault("rank_file", step, rank == ctx.world_size() - 1);
  const FileDigest d = digest_file(tmp + "/" + file);
  Json rec = local_record(file, step, skipped);
  rec["bytes"] = static_cast<int64_t>(d.bytes);
  rec["crc32"] = crc32_hex(d.crc32);
  rec["pieces"] = pieces;
  rec["shapes"] = shapes;
  return rec;
}

std::string Checkpointer::save(const std::string& run_dir, int64_t step, int64_t skipped) {
  const ParallelContext& ctx = *p_.ctx;
  Communicator& world = ctx.world();
  const int rank = ctx.world_rank();
  const std::string name = step_dir_name(step);
  const std::string final_dir = run_dir + "/" + name, tmp = run_dir + "/." + name + ".tmp";
  if (rank == 0) {
    fs::create_directories(run_dir);
    fs::remove_all(tmp);  // left by a save that was killed
    fs::create_directory(tmp);
  }
  world.barrier();

  const Json rec = write_rank_file(tmp, step, skipped);
  const std::vector<std::string> all = all_gather_strings(world, rec.dump());

  if (rank == 0) {
    std::vector<Json> records;
    for (const std::string& s : all) records.push_back(Json::parse(s, "checkpoint rank record"));
    const Json meta = build_meta(records, step, skipped);
    write_file_atomic(tmp + "/" + kCheckpointMetaFile,
                      [&](std::ofstream& f) { f << meta.dump(1) << "\n"; });
    maybe_fault("before_rename", step, true);
    fsync_directory(tmp);
    fs::rename(tmp, final_dir);
    fsync_directory(run_dir);
  }
  world.barrier();
  return final_dir;
}

Json Checkpointer::build_meta(const std::vector<Json>& records, int64_t step,
                              int64_t skipped) const {
  Json meta;
  meta["format"] = kCheckpointFormat;
  meta["version"] = kCheckpointVersion;
  meta["kind"] = has_optimizer() ? "training" : "weights";
  meta["step"] = step;
  meta["model"] = model_config_to_json(p_.model->config());
  meta["vocabulary"] = vocabulary_json();
  meta["layout"] = layout_json(*p_.ctx, p_.model->options().sequence_parallel, p_.zero ? p_.zero->stage() : 0);
  if (has_optimizer()) {
    Json t;
    t["step"] = step;
    t["skipped_steps"] = skipped;
    t["optimizer_steps_applied"] = records[0].at("optimizer_steps_applied");
    if (p_.train) t["data_cursor"] = records[0].at("data_cursor");
    t["rng"]["kind"] = "philox counter-based: keys from (seed, epoch, stream), no hidden state";
    if (p_.options) {
      t["rng"]["seed"] = static_cast<int64_t>(p_.options->seed);
      t["data_plan"] = data_plan_json(*p_.options, *p_.train);
      t["lr_schedule"] = schedule_json(*p_.options);
    }
    t["optimizer"] = optimizer_json(adam_config());
    meta["trainer"] = t;
  }
  Json files = Json(Json::Object{});
  TensorIndex index;
  for (size_t r = 0; r < records.size(); ++r) {
    const Json& rec = records[r];
    // Every rank is at the same step, cursor and optimizer count (an invariant of the trainer).
    HELIX_CHECK(
        rec.at("step").as_int() == step && rec.at("skipped").as_int() == skipped &&
            (!p_.train || rec.at("data_cursor").dump() == records[0].at("data_cursor").dump()),
        "checkpoint of step {}: rank {} disagrees on the trainer state ({} vs rank 0's {})", step,
        r, rec.dump(), records[0].dump());
    const std::string file = rec.at("file").as_string();
    files[file]["bytes"] = rec.at("bytes");
    files[file]["crc32"] = rec.at("crc32");
    for (const auto& [tname, list] : rec.at("pieces").as_object()) {
      const Json& sh = rec.at("shapes").at(tname);
      TensorIndexEntry& e = index[tname];
      Shape s;
      std::vector<int64_t> dims;
      for (const Json& x : sh.at("shape").as_array()) dims.push_back(x.as_int());
      e.shape = Shape(dims);
      e.dtype = dtype_from_safetensors(sh.at("dtype").as_string(), tname);
      e.reshard = sh.at("reshard").as_string() == "any" ? Reshard::kAny : Reshard::kSameLayout;
      for (const Json& pj : list.as_array()) e.pieces.push_back(TensorPiece::from_json(pj, tname));
    }
  }
  meta["files"] = files;
  meta["tensors"] = tensor_index_to_json(index);
  return meta;
}

void Checkpointer::check_meta(const Json& meta, const std::string& dir,
                              const std::string& flag) const {
  const std::string what = dir + "/" + kCheckpointMetaFile;
  const ModelConfig saved = model_config_from_json(meta.at("model", what), what);
  const ModelConfig& mine = p_.model->config();
  const Json a = model_config_to_json(saved), b = model_config_to_json(mine);
  for (const char* k : {"layers", "hidden", "heads", "ffn", "vocab", "max_positions",
                        "layer_norm_eps", "token_dropout", "mask_token_id", "pad_token_id"})
    HELIX_CHECK(
        a.at(k).dump() == b.at(k).dump(),
        "{} '{}': checkpoint of another model: {} {} (model '{}'), this run has {} {} (model '{}')",
        flag, dir, k, a.at(k).dump(), saved.name, k, b.at(k).dump(), mine.name);
  const Json::Array& vocab = meta.at("vocabulary", what).as_array(what);
  const Json::Array ours = vocabulary_json().as_array();
  HELIX_CHECK(vocab.size() == ours.size(),
              "{} '{}': checkpoint vocabulary has {} tokens, this helix has {}", flag, dir,
              vocab.size(), ours.size());
  for (size_t i = 0; i < ours.size(); ++i)
    HELIX_CHECK(vocab[i].as_string(what) == ours[i].as_string(),
                "{} '{}': checkpoint vocabulary differs at id {}: '{}', this helix has '{}'", flag,
                dir, i, vocab[i].as_string(what), ours[i].as_string());
  // Per-rank state only resumes on the same layout.
  const Json layout = layout_json(*p_.ctx, p_.model->options().sequence_parallel, p_.zero ? p_.zero->stage() : 0);
  const TensorIndex index = tensor_index_from_json(meta.at("tensors", what), what);
  for (const auto& [name, e] : index)
    HELIX_CHECK(e.reshard == Reshard::kAny || meta.at("layout", what).dump() == layout.dump(),
                "{} '{}': state '{}' is per-rank and was saved on {}; this run is {}: it cannot be "
                "resharded, resume "
                "on the same layout",
                flag, dir, name, layout_str(meta.at("layout", what)), layout_str(layout));
  if (!has_optimizer() || meta.at("kind", what).as_string(what) != "training" || !p_.options ||
      !p_.train)
    return;
  const Json& t = meta.at("trainer", what);
  const Json plan = data_plan_json(*p_.options, *p_.train);
  const std::pair<const char*, const char*> flags[] = {
      {"seed", "--seed"},
      {"tokens_per_rank_batch", "--tokens-per-step / (--micro-batches x data-parallel size)"},
      {"max_residues", "--max-residues"},
      {"pad_to_multiple", "--pad-to-multiple"},
      {"valid_fraction", "--valid-fraction"},
      {"train_proteins", "--data (training proteins)"}};
  for (const auto& [k, f] : flags)
    HELIX_CHECK(t.at("data_plan", what).at(k, what).dump() == plan.at(k).dump(),
                "{} '{}': {} was {} when the checkpoint was written, this run has {}; the data "
                "order would not "
                "continue where it stopped",
                flag, dir, f, t.at("data_plan").at(k).dump(), plan.at(k).dump());
  if (t.at("lr_schedule", what).dump() != schedule_json(*p_.options).dump() &&
      p_.ctx->world_rank() == 0)
    log_warn("{} '{}': the learning-rate schedule differs from the checkpoint's ({} now, {} then)",
             flag, dir, schedule_json(*p_.options).dump(), t.at("lr_schedule").dump());
  if (t.at("optimizer", what).dump() != optimizer_json(adam_config()).dump() &&
      p_.ctx->world_rank() == 0)
    log_warn("{} '{}': the AdamW settings differ from the checkpoint's ({} now, {} then)", flag,
             dir, optimizer_json(adam_config()).dump(), t.at("optimizer").dump());
}

TrainProgress Checkpointer::load(const std::string& path, const std::string& flag) {
  const ParallelContext& ctx = *p_.ctx;
  const std::string dir = resolve_checkpoint(path, flag);
  const Json meta = read_checkpoint_meta(dir);
  check_meta(meta, dir, flag);
  if (ctx.world_rank() == 0) verify_checkpoint_files(dir, meta);
  ctx.world().barrier();  // nothing is changed before rank 0 has checked every file

  const std::string what = dir + "/" + kCheckpointMetaFile;
  CheckpointReader reader(dir, tensor_index_from_json(meta.at("tensors", what), what));
  const bool training = meta.at("kind", what).as_string(what) == "training" && has_optimizer();
  std::vector<Parameter>& params = p_.model->params().all();
  // This tp rank's local tensor of a parameter (CPU f32), from the global one.
  const auto local_of = [&](const Parameter& p, const std::string& tname) {
    const Tensor full = reader.assemble(tname);
    HELIX_CHECK(full.shape() == p.full_shape && full.dtype() == DType::kF32,
                "{} '{}': tensor '{}' is {} in the checkpoint, the model needs f32{}", flag, dir,
                tname, full.str(), p.full_shape.str());
    return p_.model->shard_of(p, full);
  };
  if (!p_.zero) {
    for (size_t i = 0; i < params.size(); ++i) {
      Parameter& p = params[i];
      p.master.copy_from(local_of(p, "model/" + p.name), Stream());
      if (!training) continue;
      p_.optimizer->moments()[i].first.copy_from(local_of(p, "optim/exp_avg/" + p.name), Stream());
      p_.optimizer->moments()[i].second.copy_from(local_of(p, "optim/exp_avg_sq/" + p.name),
                                                  Stream());
    }
    p_.model->params().sync_model_copies(Stream());
  } else {
    // ZeRO: this rank's part of each unit's flat shards.
    for (size_t u = 0; u < p_.zero->num_units(); ++u) {
      for (const ZeroRange& z : zero_ranges(*p_.zero, u)) {
        const Parameter& p = params[z.param];
        const auto fill = [&](const std::string& prefix, const Tensor& shard) {
          const Tensor local = local_of(p, prefix + p.name);
          Tensor dst = shard.slice(z.shard_offset, z.shard_offset + z.end - z.begin);
          dst.copy_from(local.view(Shape{local.numel()}).slice(z.begin, z.end), Stream());
        };
        fill("model/", p_.zero->master_shard(u));
        if (!training) continue;
        fill("optim/exp_avg/", p_.zero->exp_avg_shard(u));
        fill("optim/exp_avg_sq/", p_.zero->exp_avg_sq_shard(u));
      }
    }
    p_.zero->refresh_model_copies(Stream());
  }
  TrainProgress progress;
  if (!training) {
    if (ctx.world_rank() == 0)
      log_info("loaded weights of {} (step {})", dir, meta.at("step", what).as_int(what));
    return progress;
  }
  for (ExtraState& e : extra_) {
    const std::string tname = e.reshard == Reshard::kAny
                                  ? "extra/" + e.name
                                  : "extra/" + e.name + "@rank" + std::to_string(ctx.world_rank());
    if (!reader.has(tname)) {
      if (ctx.world_rank() == 0)
        log_warn("{} '{}': no state '{}' in the checkpoint; it starts fresh", flag, dir, e.name);
      continue;
    }
    const Tensor full = reader.assemble(tname);
    HELIX_CHECK(full.shape() == e.tensor.shape() && full.dtype() == e.tensor.dtype(),
                "{} '{}': state '{}' is {} in the checkpoint, this run needs {}", flag, dir, e.name,
                full.str(), e.tensor.str());
    e.tensor.copy_from(full, Stream());
  }
  const Json& t = meta.at("trainer", what);
  progress.step = t.at("step", what).as_int(what);
  progress.skipped = t.at("skipped_steps", what).as_int(what);
  set_steps_applied(t.at("optimizer_steps_applied", what).as_int(what));
  if (p_.train && t.has("data_cursor"))
    p_.train->set_cursor(DataCursor{t.at("data_cursor").at("epoch", what).as_int(what),
                                    t.at("data_cursor").at("position", what).as_int(what)});
  resumed_step_ = progress.step;
  if (ctx.world_rank() == 0)
    log_info("resumed from {} (step {}, saved on {}), data cursor epoch {} position {}", dir,
             progress.step, layout_str(meta.at("layout", what)),
             p_.train ? p_.train->cursor().epoch : 0, p_.train ? p_.train->cursor().position : 0);
  return progress;
}

TrainProgress Checkpointer::resume(const CheckpointOptions& o) {
  TrainProgress progress;
  if (!o.resume.empty()) progress = load(o.resume, "--resume");
  if (!o.save_dir.empty()) {
    const std::vector<CheckpointDir> existing = list_checkpoints(o.save_dir);
    HELIX_CHECK(existing.empty() || existing.back().step <= progress.step,
                "--save '{}': holds checkpoints up to step {}, past this run's start (step {}); "
                "continuing would "
                "overwrite them: pass --resume '{}' or choose another directory",
                o.save_dir, existing.back().step, progress.step, o.save_dir);
  }
  if (p_.options)
    HELIX_CHECK(progress.step < p_.options->last_step(),
                "--resume '{}': the checkpoint is at step {}, this run ends at step {} (--steps / "
                "--stop-after): "
                "nothing to do",
                o.resume, progress.step, p_.options->last_step());
  resumed_step_ = progress.step;
  return progress;
}

void Checkpointer::after_step(const CheckpointOptions& o, int64_t step, int64_t last_step,
                              int64_t skipped) {
  if (o.save_dir.empty() || step == resumed_step_) return;
  const bool due = (o.save_every > 0 && step % o.save_every == 0) || step == last_step;
  if (!due) return;
  const std::string dir = save(o.save_dir, step, skipped);
  if (p_.ctx->world_rank() != 0) return;
  log_info("checkpoint {} written", dir);
  // --keep: prune the oldest complete checkpoints, and any temporary directory of a killed save.
  const std::vector<CheckpointDir> all = list_checkpoints(o.save_dir);
  if (o.keep > 0)
    for (size_t i = 0; i + static_cast<size_t>(o.keep) < all.size(); ++i)
      fs::remove_all(all[i].path);
  for (const auto& e : fs::directory_iterator(o.save_dir)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.starts_with(".step_") && n.ends_with(".tmp"))
      fs::remove_all(e.path());
  }
}

}  // namespace helix
