#pragma once
// ProteinDataset: the good records of a FASTA file, read once by the streaming reader and held as
// residue ids (one byte each, ids 4..30) in one buffer with offsets, plus a 64-bit hash of each
// record id. Random access by index is what shuffling and packing need; headers are not kept.
// Memory is about one byte per residue (full Swiss-Prot: 170 MB), on every data-parallel rank.
// The train/validation split is a pure function of the id hash, so it is stable across runs, seeds
// and file order, and a record keeps its side when the file grows.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "launch/data/fasta.h"

namespace helix {

class ProteinDataset {
 public:
  ProteinDataset() = default;

  // Reads every record of a FASTA / FASTA.gz file. Throws when no good record remains (an empty
  // file, or every record skipped), naming the file and the counts of skipped records by kind.
  static ProteinDataset from_fasta(const std::string& path, const FastaOptions& opt = {});

  // Appends one record; `sequence` must hold only residues (esm_residue_id >= 0), else throws.
  void add(std::string_view id, std::string_view sequence);

  int64_t size() const { return static_cast<int64_t>(id_hash_.size()); }
  int64_t length(int64_t i) const { return offsets_[i + 1] - offsets_[i]; }  // residues
  std::span<const uint8_t> residues(int64_t i) const {  // token ids [length(i)]
    return {residues_.data() + offsets_[i], static_cast<size_t>(length(i))};
  }
  uint64_t id_hash(int64_t i) const { return id_hash_[static_cast<size_t>(i)]; }
  int64_t total_residues() const { return offsets_.back(); }
  int64_t max_length() const { return max_length_; }
  // Reader statistics of from_fasta (skipped records by kind); zeros for datasets built with add().
  const FastaStats& fasta_stats() const { return stats_; }

 private:
  std::vector<uint8_t> residues_;    // [total_residues] token ids
  std::vector<int64_t> offsets_{0};  // [size + 1]
  std::vector<uint64_t> id_hash_;    // [size] FNV-1a 64 of the record id
  int64_t max_length_ = 0;
  FastaStats stats_;
};

// 64-bit FNV-1a of a record id (the split hashes this, mixed with the split seed).
uint64_t hash_record_id(std::string_view id);

enum class Split { kTrain, kValidation, kAll };

struct SplitOptions {
  double validation_fraction = 0.0;  // in [0, 1): share of records (by id hash) held out
  uint64_t split_seed = 0;  // changes which records are held out; independent of the run seed
};

// True when the record with this id hash belongs to the validation split.
bool in_validation(uint64_t id_hash, const SplitOptions& opt);

// Indices (ascending) of the records of one split.
std::vector<int64_t> split_indices(const ProteinDataset& data, Split split,
                                   const SplitOptions& opt);

}  // namespace helix
