#pragma once
// Streaming FASTA / FASTA.gz reader: zlib's gzread fills a 256 KiB buffer (plain files pass through
// gzread unchanged), lines are cut from it, one record is held at a time; the file is never loaded
// whole. Every malformed input stops with one error "FILE:LINE: what" (helix::Error), or, with
// skip_bad_records, the record is dropped and counted by kind. Damaged gzip data always stops.
#include <zlib.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace helix {

struct FastaOptions {
  // Skip and count malformed records instead of stopping at the first one.
  bool skip_bad_records = false;
  // Longest accepted line, in bytes without the line end. 1 MiB holds an unwrapped titin (~35k
  // residues) thirty times over, yet a "line of gigabytes" is refused after reading 1 MiB of it.
  int64_t max_line_bytes = int64_t{1} << 20;
  // Most residues accepted in one record (after removing whitespace and a final '*').
  int64_t max_record_residues = int64_t{1} << 20;
};

// Kinds of malformed records, counted when skip_bad_records is on.
enum class FastaProblem : int {
  kBinary,        // a NUL, control or non-ASCII byte in a sequence line, a control byte in a header
  kNoSequence,    // a header followed by another header or the end of the file
  kBadCharacter,  // a printable character outside the alphabet (see esm_residue_id), '*' not last
  kTooLong,       // a line over max_line_bytes or a record over max_record_residues
  kNoId,          // a header with nothing after '>'
  kNoHeader,      // sequence lines before the first header
  kCount
};
std::string_view fasta_problem_name(FastaProblem p);

struct FastaStats {
  int64_t records = 0;   // good records returned
  int64_t residues = 0;  // residues in good records
  int64_t lines = 0;     // lines read so far
  std::array<int64_t, static_cast<int>(FastaProblem::kCount)> skipped{};  // by FastaProblem
  std::string first_problem;  // "FILE:LINE: ..." of the first skipped record, empty if none
  int64_t skipped_total() const;
  // "3 records skipped: 2 no sequence, 1 binary data; first: FILE:LINE: ..." (for logs and errors).
  std::string skipped_summary() const;
};

struct FastaRecord {
  std::string id;        // first word of the header, without '>'
  std::string header;    // the whole header line without '>' and the line end
  std::string sequence;  // residues, upper-cased, whitespace and a final '*' removed
  int64_t line = 0;      // line number (1-based) of the header
};

class FastaReader {
 public:
  FastaReader(std::string path, const FastaOptions& opt = {});
  ~FastaReader();
  FastaReader(const FastaReader&) = delete;
  FastaReader& operator=(const FastaReader&) = delete;

  // Next good record into `rec`; false at the end of the file. Throws helix::Error for malformed
  // input (unless skipped), an empty file, or unreadable / corrupt gzip data.
  bool next(FastaRecord& rec);
  const FastaStats& stats() const { return stats_; }
  const std::string& path() const { return path_; }

 private:
  enum class LineKind { kLine, kTooLong, kEnd };
  LineKind read_line();  // next line into line_ (without "\n" / "\r\n"), line_no_ advanced
  bool fill();           // refill buf_ from gzread; false at the end of the data
  // Records `problem` for the record starting at `line`: throws unless skip_bad_records.
  void problem(FastaProblem kind, int64_t line, const std::string& what);
  // Skips blank lines to the first header (reporting lines before it); kEnd at the end of the file.
  LineKind seek_first_header();
  // Fills rec's id and header from the header line in line_; false (problem recorded) when bad.
  bool parse_header(FastaRecord& rec, LineKind kind);
  // Reads the sequence lines up to the next header or the end; false when the record is bad.
  // `good` false: the header was bad, the lines are only skipped.
  bool read_sequence(FastaRecord& rec, bool good);
  // Checks one sequence line and appends its residues; false (problem recorded) when bad.
  bool append_sequence_line(FastaRecord& rec, bool& stop_seen);

  std::string path_;
  FastaOptions opt_;
  gzFile gz_ = nullptr;
  std::string buf_;
  size_t pos_ = 0, end_ = 0;
  bool eof_ = false;
  std::string line_;
  int64_t line_no_ = 0;
  bool pending_header_ = false;  // line_ holds a header already read by the previous record
  LineKind pending_kind_ = LineKind::kLine;
  bool any_content_ = false;  // a non-blank line was seen
  FastaStats stats_;
};

}  // namespace helix
