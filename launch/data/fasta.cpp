#include "launch/data/fasta.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "launch/data/tokenizer.h"

namespace helix {
namespace {

constexpr size_t kReadChunk = size_t{256} << 10;  // bytes per gzread
constexpr size_t kKeptPrefix = 48;                // bytes of an over-long line kept for messages

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t'; });
}
bool is_control(unsigned char c) { return (c < 0x20 && c != '\t') || c == 0x7F; }

// First byte that marks binary data: a control byte, or with `ascii_only` also a byte >= 0x80.
// Headers allow UTF-8 text; sequence lines and lines before the first header do not.
size_t find_binary(std::string_view s, bool ascii_only) {
  for (size_t i = 0; i < s.size(); ++i) {
    const auto u = static_cast<unsigned char>(s[i]);
    if (is_control(u) || (ascii_only && u >= 0x80)) return i;
  }
  return std::string_view::npos;
}

// Printable excerpt of a line for messages.
std::string excerpt(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 24)) out += (c >= 0x20 && c < 0x7F) ? c : '?';
  return s.size() > 24 ? out + "..." : out;
}

constexpr const char* kSkipHint = " (--skip-bad-records skips and counts such records)";

}  // namespace

std::string_view fasta_problem_name(FastaProblem p) {
  switch (p) {
    case FastaProblem::kBinary:
      return "binary data";
    case FastaProblem::kNoSequence:
      return "no sequence";
    case FastaProblem::kBadCharacter:
      return "character outside the alphabet";
    case FastaProblem::kTooLong:
      return "too long";
    case FastaProblem::kNoId:
      return "no id";
    case FastaProblem::kNoHeader:
      return "no header";
    case FastaProblem::kCount:
      break;
  }
  return "?";
}

std::string FastaStats::skipped_summary() const {
  std::string counts;
  for (int k = 0; k < static_cast<int>(FastaProblem::kCount); ++k) {
    const int64_t n = skipped[static_cast<size_t>(k)];
    if (n > 0)
      counts += fmt::format("{}{} {}", counts.empty() ? "" : ", ", n,
                            fasta_problem_name(static_cast<FastaProblem>(k)));
  }
  if (counts.empty()) return "0 records skipped";
  return fmt::format("{} records skipped: {}; first: {}", skipped_total(), counts, first_problem);
}

int64_t FastaStats::skipped_total() const {
  int64_t n = 0;
  for (const int64_t s : skipped) n += s;
  return n;
}

FastaReader::FastaReader(std::string path, const FastaOptions& opt)
    : path_(std::move(path)), opt_(opt) {
  HELIX_CHECK(
      opt_.max_line_bytes > 0 && opt_.max_record_residues > 0,
      "FASTA options: expected positive max_line_bytes and max_record_residues, got {} and {}",
      opt_.max_line_bytes, opt_.max_record_residues);
  std::error_code ec;
  HELIX_CHECK(!std::filesystem::is_directory(path_, ec),
              "{}: expected a FASTA file, got a directory", path_);
  gz_ = gzopen(path_.c_str(), "rb");
  HELIX_CHECK(gz_ != nullptr, "{}: cannot open: {}", path_,
              errno ? std::strerror(errno) : "out of memory");
  gzbuffer(gz_, static_cast<unsigned>(kReadChunk));
  buf_.resize(kReadChunk);
}

FastaReader::~FastaReader() {
  if (gz_) gzclose(gz_);
}

bool FastaReader::fill() {
  if (eof_) return false;
  const int got = gzread(gz_, buf_.data(), static_cast<unsigned>(buf_.size()));
  int err = Z_OK;
  const char* msg = gzerror(gz_, &err);
  // Z_BUF_ERROR: the gzip stream ended early (a truncated .gz).
  HELIX_CHECK(got >= 0 && (err == Z_OK || err == Z_STREAM_END),
              "{}:{}: cannot read the file: {} (damaged or truncated gzip data?)", path_,
              line_no_ + 1, msg ? msg : "read error");
  pos_ = 0;
  end_ = static_cast<size_t>(got);
  if (got == 0) eof_ = true;
  return got > 0;
}

FastaReader::LineKind FastaReader::read_line() {
  line_.clear();
  const size_t limit = static_cast<size_t>(opt_.max_line_bytes) + 1;  // + a '\r' of "\r\n"
  bool any = false, too_long = false;
  for (;;) {
    if (pos_ >= end_ && !fill()) break;
    any = true;
    const char* start = buf_.data() + pos_;
    const char* nl = static_cast<const char*>(std::memchr(start, '\n', end_ - pos_));
    const size_t n = nl ? static_cast<size_t>(nl - start) : end_ - pos_;
    if (!too_long && line_.size() + n > limit) {
      too_long = true;
      line_.append(start, std::min(n, kKeptPrefix > line_.size() ? kKeptPrefix - line_.size() : 0));
      line_.resize(std::min(line_.size(), kKeptPrefix));
    } else if (!too_long) {
      line_.append(start, n);
    }
    pos_ += n;
    if (nl) {
      ++pos_;
      break;
    }
  }
  if (!any) return LineKind::kEnd;
  ++line_no_;
  ++stats_.lines;
  if (!too_long && !line_.empty() && line_.back() == '\r') line_.pop_back();
  if (!too_long && line_.size() > static_cast<size_t>(opt_.max_line_bytes)) too_long = true;
  return too_long ? LineKind::kTooLong : LineKind::kLine;
}

void FastaReader::problem(FastaProblem kind, int64_t line, const std::string& what) {
  std::string msg = fmt::format("{}:{}: {}", path_, line, what);
  if (!opt_.skip_bad_records) HELIX_FAIL("{}{}", msg, kSkipHint);
  ++stats_.skipped[static_cast<size_t>(kind)];
  if (stats_.first_problem.empty()) stats_.first_problem = std::move(msg);
}

bool FastaReader::append_sequence_line(FastaRecord& rec, bool& stop_seen) {
  for (size_t i = 0; i < line_.size(); ++i) {
    const char c = line_[i];
    if (c == ' ' || c == '\t') continue;
    const auto u = static_cast<unsigned char>(c);
    if (is_control(u) || u >= 0x80) {
      problem(
          FastaProblem::kBinary, line_no_,
          fmt::format("binary data: byte 0x{:02X} at column {} in record '{}'", u, i + 1, rec.id));
      return false;
    }
    if (c == '*' && !stop_seen) {
      stop_seen = true;
      continue;
    }
    if (esm_residue_id(c) < 0) {
      problem(
          FastaProblem::kBadCharacter, line_no_,
          fmt::format("character '{}' at column {} in record '{}' is outside the ESM alphabet "
                      "(accepted: LAGVSERTIDPKQNFYMHWCXBUZO in either case, '.', '-', and one '*' "
                      "ending the record)",
                      c, i + 1, rec.id));
      return false;
    }
    if (stop_seen) {
      problem(FastaProblem::kBadCharacter, line_no_,
              fmt::format("residue '{}' at column {} in record '{}' follows a '*' (a stop '*' is "
                          "accepted only at the end of a record)",
                          c, i + 1, rec.id));
      return false;
    }
    if (static_cast<int64_t>(rec.sequence.size()) >= opt_.max_record_residues) {
      problem(FastaProblem::kTooLong, line_no_,
              fmt::format("record '{}' (header on line {}) has more than {} residues "
                          "(max_record_residues)",
                          rec.id, rec.line, opt_.max_record_residues));
      return false;
    }
    rec.sequence += (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c;
  }
  return true;
}

FastaReader::LineKind FastaReader::seek_first_header() {
  bool orphan = false;  // sequence data before the first header, reported once
  for (;;) {
    const LineKind kind = read_line();
    if (kind == LineKind::kEnd) {
      HELIX_CHECK(any_content_,
                  "{}:{}: empty file: expected FASTA records ('>' header lines), found none", path_,
                  std::max<int64_t>(line_no_, 1));
      return kind;
    }
    if (kind == LineKind::kLine && is_blank(line_)) continue;
    any_content_ = true;
    if (!line_.empty() && line_[0] == '>') return kind;
    if (orphan) continue;
    orphan = true;
    const size_t bad = find_binary(line_, /*ascii_only=*/true);
    if (bad != std::string::npos)
      problem(FastaProblem::kBinary, line_no_,
              fmt::format("binary data (byte 0x{:02X} at column {}) where a '>' header line was "
                          "expected; is this a FASTA file?",
                          static_cast<unsigned char>(line_[bad]), bad + 1));
    else
      problem(FastaProblem::kNoHeader, line_no_,
              fmt::format("expected a '>' header line, got '{}'", excerpt(line_)));
  }
}

bool FastaReader::parse_header(FastaRecord& rec, LineKind kind) {
  rec.id.clear();
  rec.header.clear();
  rec.sequence.clear();
  rec.line = line_no_;
  if (kind == LineKind::kTooLong) {
    problem(FastaProblem::kTooLong, line_no_,
            fmt::format("header line longer than {} bytes (max_line_bytes)", opt_.max_line_bytes));
    return false;
  }
  rec.header = line_.substr(1);
  rec.id = rec.header.substr(0, rec.header.find_first_of(" \t"));
  const size_t bad = find_binary(rec.header, /*ascii_only=*/false);
  if (bad != std::string::npos) {
    problem(FastaProblem::kBinary, line_no_,
            fmt::format("binary data: byte 0x{:02X} at column {} of a header line",
                        static_cast<unsigned char>(rec.header[bad]), bad + 2));
    return false;
  }
  if (rec.id.empty()) {
    problem(FastaProblem::kNoId, line_no_, "header line with no id after '>'");
    return false;
  }
  return true;
}

bool FastaReader::read_sequence(FastaRecord& rec, bool good) {
  bool stop_seen = false;
  for (;;) {
    const LineKind k = read_line();
    if (k == LineKind::kEnd) break;
    if (!line_.empty() && line_[0] == '>') {  // the next record's header
      pending_header_ = true;
      pending_kind_ = k;
      break;
    }
    if (k == LineKind::kTooLong) {
      if (good)
        problem(FastaProblem::kTooLong, line_no_,
                fmt::format("line longer than {} bytes (max_line_bytes) in record '{}'",
                            opt_.max_line_bytes, rec.id));
      good = false;
      continue;
    }
    if (good) good = append_sequence_line(rec, stop_seen);  // a bad record's lines are only skipped
  }
  if (good && rec.sequence.empty()) {
    problem(FastaProblem::kNoSequence, rec.line,
            fmt::format("record '{}' has no sequence (followed by {})", rec.id,
                        pending_header_ ? "another header" : "the end of the file"));
    good = false;
  }
  return good;
}

bool FastaReader::next(FastaRecord& rec) {
  for (;;) {
    // The header the previous record stopped at, or the first of the file.
    LineKind kind = pending_kind_;
    if (pending_header_) {
      pending_header_ = false;
    } else {
      kind = seek_first_header();
      if (kind == LineKind::kEnd) return false;
    }
    const bool header_ok = parse_header(rec, kind);
    if (read_sequence(rec, header_ok)) {
      ++stats_.records;
      stats_.residues += static_cast<int64_t>(rec.sequence.size());
      return true;
    }
  }
}

}  // namespace helix
