#include "launch/data/loader.h"

#include <utility>

#include "core/error.h"
#include "core/philox.h"

namespace helix {

DataLoader::DataLoader(std::shared_ptr<const ProteinDataset> data, std::vector<int64_t> indices,
                       const DataLoaderOptions& opt)
    : data_(std::move(data)), indices_(std::move(indices)), opt_(opt) {
  HELIX_CHECK(data_ != nullptr, "data loader: expected a dataset, got none");
  HELIX_CHECK(!indices_.empty(),
              "data loader: expected at least one protein in the split, got none");
  HELIX_CHECK(opt_.world_size >= 1 && opt_.rank >= 0 && opt_.rank < opt_.world_size,
              "data loader: expected 0 <= rank < world_size, got rank {} of {}", opt_.rank,
              opt_.world_size);
  check_packing_options(opt_.packing);
  check_masking_options(opt_.masking);
  int64_t longest = 0;
  for (const int64_t i : indices_) {
    HELIX_CHECK(i >= 0 && i < data_->size(),
                "data loader: expected dataset indices in [0, {}), got {}", data_->size(), i);
    longest = std::max(longest, data_->length(i));
  }
  // Fail before any work when the longest crop cannot fit (plan_batches would, later).
  const int64_t need = padded_tokens(sample_tokens(longest, opt_.packing.max_residues),
                                     opt_.packing.pad_to_multiple);
  HELIX_CHECK(
      need <= opt_.packing.tokens_per_batch,
      "data loader: the longest protein needs {} tokens after the crop to {} residues "
      "(+ <cls>, <eos>, padding to a multiple of {}), expected --tokens-per-batch >= {}, got {}",
      need, opt_.packing.max_residues, opt_.packing.pad_to_multiple, need,
      opt_.packing.tokens_per_batch);
}

std::vector<int64_t> DataLoader::epoch_order(int64_t epoch) const {
  HELIX_CHECK(epoch >= 0, "data loader: expected epoch >= 0, got {}", epoch);
  std::vector<int64_t> order = indices_;
  if (!opt_.shuffle) return order;
  // Fisher-Yates from the back; swap k draws 64 bits from block k of the shuffle stream.
  const uint64_t key = stream_key(opt_.seed, epoch, RandomStream::kShuffle);
  for (size_t k = order.size(); k > 1; --k) {
    const U32x4 r = philox_block(key, 0, k);
    const uint64_t x = (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
    const auto j = static_cast<size_t>((static_cast<unsigned __int128>(x) * k) >> 64);  // [0, k)
    std::swap(order[k - 1], order[j]);
  }
  return order;
}

const DataLoader::Plan& DataLoader::plan(int64_t epoch) const {
  if (plan_.epoch != epoch) {
    plan_.order = epoch_order(epoch);
    plan_.batches = plan_batches(*data_, plan_.order, opt_.packing);
    plan_.epoch = epoch;
  }
  return plan_;
}

int64_t DataLoader::num_batches(int64_t epoch) const {
  return static_cast<int64_t>(plan(epoch).batches.size());
}

PackedBatch DataLoader::batch(int64_t epoch, int64_t global_index) const {
  const Plan& p = plan(epoch);
  HELIX_CHECK(global_index >= 0 && global_index < static_cast<int64_t>(p.batches.size()),
              "data loader: expected a batch index in [0, {}) for epoch {}, got {}",
              p.batches.size(), epoch, global_index);
  const BatchRange r = p.batches[static_cast<size_t>(global_index)];
  const std::span<const int64_t> ids(p.order.data() + r.begin,
                                     static_cast<size_t>(r.end - r.begin));
  PackedBatch out =
      pack_batch(*data_, ids, PackParams{opt_.seed, epoch, opt_.packing, opt_.masking});
  out.global_index = global_index;
  return out;
}

PackedBatch DataLoader::next() {
  const int64_t n = opt_.world_size;
  while (cursor_.position + n > num_batches(cursor_.epoch)) {
    HELIX_CHECK(
        num_batches(cursor_.epoch) >= n,
        "data loader: epoch {} has {} batches of --tokens-per-batch {}, expected at least one "
        "per data-parallel rank ({}); use a smaller budget or more data",
        cursor_.epoch, num_batches(cursor_.epoch), opt_.packing.tokens_per_batch, n);
    cursor_ = {cursor_.epoch + 1, 0};
  }
  PackedBatch out = batch(cursor_.epoch, cursor_.position + opt_.rank);
  cursor_.position += n;
  return out;
}

void DataLoader::set_cursor(const DataCursor& c) {
  HELIX_CHECK(c.epoch >= 0 && c.position >= 0,
              "data loader: expected a cursor with epoch >= 0 and position >= 0, got ({}, {})",
              c.epoch, c.position);
  cursor_ = c;
}

}  // namespace helix
