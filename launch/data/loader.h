#pragma once
// DataLoader: the micro-batches of one data-parallel rank. Per epoch the split's proteins are put
// in a seeded order (Philox Fisher-Yates keyed by seed and epoch), cut greedily into packed batches
// (the epoch's plan), and the plan's global batches are dealt round-robin: at cursor position p,
// rank r takes global batch p + r and every rank advances p by world_size. The tail of an epoch
// that cannot give every rank a batch is dropped, so all ranks do the same number of batches per
// step. The cursor (epoch, position) is the same on every rank and is all a checkpoint must save: a
// batch is a pure function of (dataset, split, options, epoch, global batch index).
#include <cstdint>
#include <memory>
#include <vector>

#include "launch/data/dataset.h"
#include "launch/data/packing.h"

namespace helix {

struct DataCursor {
  int64_t epoch = 0;
  int64_t position = 0;  // global batches of the epoch already dealt to the ranks
  bool operator==(const DataCursor&) const = default;
};

struct DataLoaderOptions {
  uint64_t seed = 0;
  bool shuffle = true;  // false: the order of `indices` every epoch (validation)
  PackingOptions packing;
  MaskingOptions masking;
  int rank = 0;        // data-parallel rank
  int world_size = 1;  // data-parallel size
};

class DataLoader {
 public:
  // `indices`: the proteins of the split (e.g. split_indices(...)). The dataset is shared.
  DataLoader(std::shared_ptr<const ProteinDataset> data, std::vector<int64_t> indices,
             const DataLoaderOptions& opt);

  // This rank's next micro-batch; moves to the next epoch when the current one has fewer than
  // world_size global batches left.
  PackedBatch next();

  const DataCursor& cursor() const { return cursor_; }
  // Restores a saved cursor (any position of any epoch; next() then continues from there).
  void set_cursor(const DataCursor& c);

  // Global batches in the plan of `epoch` (before dropping the tail).
  int64_t num_batches(int64_t epoch) const;
  // Batches each rank gets from `epoch`: num_batches(epoch) / world_size.
  int64_t batches_per_rank(int64_t epoch) const { return num_batches(epoch) / opt_.world_size; }
  // Global batch `global_index` of `epoch`, whichever rank it belongs to (validation loops and
  // tests).
  PackedBatch batch(int64_t epoch, int64_t global_index) const;
  // Protein order of `epoch` (dataset indices).
  std::vector<int64_t> epoch_order(int64_t epoch) const;

  const DataLoaderOptions& options() const { return opt_; }
  int64_t num_proteins() const { return static_cast<int64_t>(indices_.size()); }

 private:
  struct Plan {
    int64_t epoch = -1;
    std::vector<int64_t> order;       // dataset indices in the epoch's order
    std::vector<BatchRange> batches;  // into order
  };
  const Plan& plan(int64_t epoch) const;  // cached for the last epoch asked for

  std::shared_ptr<const ProteinDataset> data_;
  std::vector<int64_t> indices_;
  DataLoaderOptions opt_;
  DataCursor cursor_;
  mutable Plan plan_;
};

}  // namespace helix
