#pragma once
// `helix convert` (Hugging Face EsmForMaskedLM safetensors <-> helix checkpoint) and `helix eval`
// (masked-LM loss and perplexity of a checkpoint on a FASTA file, with deterministic masking). Both
// build the model from the checkpoint's own metadata (or the HF config.json), so no model flags are
// needed.
#include <string>
#include <vector>

namespace helix {

// Arguments without the command word. Return the process exit code (0 also after --help).
int run_convert(const std::vector<std::string>& args);
int run_eval(const std::vector<std::string>& args);

}  // namespace helix
