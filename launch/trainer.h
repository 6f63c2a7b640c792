#pragma once
// The single-process trainer behind `helix train`: data loading, the ESM-2 model, AdamW with
// clipping and the non-finite skip, gradient accumulation over micro-batches, validation perplexity,
// metrics (progress line and JSONL) and the final Hugging Face export.
#include "launch/train_options.h"

namespace helix {

struct TrainSummary {
  int64_t steps = 0;
  int64_t skipped = 0;
  double first_loss = 0, last_loss = 0;  // mean train loss of the first and the last step
  double valid_loss = 0;                 // final validation loss (NaN without a validation split)
};

TrainSummary run_train(const TrainOptions& options);

}  // namespace helix
