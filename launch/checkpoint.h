#pragma once
// Sharded, atomic training checkpoints (collective over the world). Every rank writes one
// safetensors file with the pieces of the tensors it owns (fp32 masters, AdamW moments, registered
// extra state) into a temporary directory; rank 0 gathers the ranks' piece lists and file digests,
// writes meta.json (model, vocabulary, layout, trainer state, tensor index, CRC-32 per file) and
// renames the directory to step_XXXXXXXX only after every rank has written and fsynced. Resume
// assembles each global tensor from the index and takes this rank's shard, so a checkpoint resumes
// on any parallel layout the model supports. Format: launch/checkpoint_format.h,
// docs/checkpoints.md.
#include <string>
#include <vector>

#include "core/json.h"
#include "core/tensor.h"
#include "launch/checkpoint_format.h"
#include "launch/checkpoint_options.h"
#include "layers/model_config.h"

namespace helix {

class AdamW;
class ZeroAdamW;
class ZeroSync;
struct AdamWConfig;
class DataLoader;
class Esm2Model;
class ParallelContext;
struct TrainOptions;

// State other than parameters and optimizer moments (FP8 scaling histories, ...), registered by
// whoever owns it before resume(). The tensor is written on save and overwritten in place on
// resume.
struct ExtraState {
  std::string name;                 // unique, e.g. "fp8/amax_history"
  Tensor tensor;                    // this rank's tensor (any device)
  Reshard reshard = Reshard::kAny;  // kAny: identical on every rank (world rank 0 writes it, any
                                    // layout reads it); kSameLayout: one tensor per rank
};

struct CheckpointerParams {
  const ParallelContext* ctx = nullptr;   // required
  Esm2Model* model = nullptr;             // required
  AdamW* optimizer = nullptr;  // null (and no zero_optimizer): weights only (convert, eval)
  ZeroSync* zero = nullptr;             // --zero: masters and moments live in its flat shards
  ZeroAdamW* zero_optimizer = nullptr;  // --zero: the step counter and AdamW settings
  DataLoader* train = nullptr;            // null: no data cursor
  const TrainOptions* options = nullptr;  // null: no data plan / schedule recorded or checked
};

// Where training continues after a resume.
struct TrainProgress {
  int64_t step = 0;     // optimizer steps done (the next step's 0-based index)
  int64_t skipped = 0;  // non-finite steps skipped so far
};

class Checkpointer {
 public:
  explicit Checkpointer(const CheckpointerParams& p);

  void add_state(ExtraState s);

  // Loads checkpoint `path` (a checkpoint directory, or a run directory: its newest complete
  // checkpoint). Collective. Rank 0 verifies every file (size, CRC-32) and the metadata (format,
  // model, vocabulary, data plan) first, so damaged or foreign input is refused before anything is
  // changed. A "weights" checkpoint (helix convert), or a Checkpointer without optimizer, restores
  // parameters only and returns step 0. `flag` names the option in messages.
  TrainProgress load(const std::string& path, const std::string& flag);

  // The trainer's entry points: resume() applies --resume (step 0 without it) and refuses a --save
  // directory whose checkpoints the run would overwrite; after_step() saves when --save-every or
  // the end of the process says so.
  TrainProgress resume(const CheckpointOptions& o);
  void after_step(const CheckpointOptions& o, int64_t step, int64_t last_step, int64_t skipped);

  // Writes run_dir/step_XXXXXXXX (collective). Returns the checkpoint directory.
  std::string save(const std::string& run_dir, int64_t step, int64_t skipped);

 private:
  bool has_optimizer() const { return p_.optimizer || p_.zero_optimizer; }
  int64_t steps_applied() const;
  void set_steps_applied(int64_t s);
  const AdamWConfig& adam_config() const;
  Json local_record(const std::string& file, int64_t step, int64_t skipped) const;
  Json write_rank_file(const std::string& tmp, int64_t step, int64_t skipped) const;
  Json build_meta(const std::vector<Json>& records, int64_t step, int64_t skipped) const;
  void check_meta(const Json& meta, const std::string& dir, const std::string& flag) const;

  CheckpointerParams p_;
  std::vector<ExtraState> extra_;
  int64_t resumed_step_ = -1;
};

// The model block of meta.json and back (the shape fields every checkpoint records).
Json model_config_to_json(const ModelConfig& c);
ModelConfig model_config_from_json(const Json& j, const std::string& what);
// The ESM-2 alphabet as recorded in meta.json.
Json vocabulary_json();

// Hugging Face EsmConfig (config.json) of a model, so transformers opens an export as
// EsmForMaskedLM; and the inverse for the fields helix uses.
Json hf_config(const ModelConfig& c);
ModelConfig model_config_from_hf(const Json& j, const std::string& what);

}  // namespace helix
