#include "launch/data/dataset.h"

#include <fmt/format.h>

#include "core/error.h"
#include "core/log.h"
#include "launch/data/sample.h"
#include "launch/data/tokenizer.h"

namespace helix {

uint64_t hash_record_id(std::string_view id) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a offset basis
  for (const char c : id) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ull;  // FNV prime
  }
  return h;
}

void ProteinDataset::add(std::string_view id, std::string_view sequence) {
  HELIX_CHECK(!sequence.empty(), "dataset: record '{}': expected at least one residue, got none",
              id);
  for (size_t i = 0; i < sequence.size(); ++i) {
    const int32_t t = esm_residue_id(sequence[i]);
    if (t < 0) {
      residues_.resize(static_cast<size_t>(offsets_.back()));  // drop the partial record
      HELIX_FAIL("dataset: record '{}': expected residues, got byte 0x{:02X} at position {}", id,
                 static_cast<uint8_t>(sequence[i]), i);
    }
    residues_.push_back(static_cast<uint8_t>(t));
  }
  offsets_.push_back(static_cast<int64_t>(residues_.size()));
  id_hash_.push_back(hash_record_id(id));
  max_length_ = std::max<int64_t>(max_length_, static_cast<int64_t>(sequence.size()));
}

ProteinDataset ProteinDataset::from_fasta(const std::string& path, const FastaOptions& opt) {
  ProteinDataset data;
  FastaReader reader(path, opt);
  FastaRecord rec;
  while (reader.next(rec)) data.add(rec.id, rec.sequence);
  data.residues_.shrink_to_fit();  // growth by doubling leaves up to half the buffer unused
  data.stats_ = reader.stats();
  const FastaStats& s = data.stats_;
  HELIX_CHECK(data.size() > 0, "{}: expected at least one good FASTA record, got none ({})", path,
              s.skipped_summary());
  if (s.skipped_total() > 0)
    log_warn("{}: {} good records, {}", path, data.size(), s.skipped_summary());
  return data;
}

bool in_validation(uint64_t id_hash, const SplitOptions& opt) {
  if (opt.validation_fraction <= 0.0) return false;
  const uint64_t h =
      splitmix64(id_hash ^ splitmix64(opt.split_seed ^ 0x73706c6974ull /* "split" */));
  return static_cast<double>(h >> 11) * 0x1.0p-53 < opt.validation_fraction;
}

std::vector<int64_t> split_indices(const ProteinDataset& data, Split split,
                                   const SplitOptions& opt) {
  HELIX_CHECK(opt.validation_fraction >= 0.0 && opt.validation_fraction < 1.0,
              "split: expected a validation fraction in [0, 1), got {}", opt.validation_fraction);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(data.size()));
  for (int64_t i = 0; i < data.size(); ++i) {
    if (split == Split::kAll ||
        (split == Split::kValidation) == in_validation(data.id_hash(i), opt))
      out.push_back(i);
  }
  return out;
}

}  // namespace helix
