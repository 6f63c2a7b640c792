// FASTA / FASTA.gz reader: wrapped lines, gzip, CRLF, every malformed case with its "FILE:LINE:
// what" message, skip mode counts, and the dataset built on top.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "launch/data/dataset.h"
#include "launch/data/fasta.h"

namespace helix {
namespace {

namespace fs = std::filesystem;
using namespace std::string_literals;

// A fresh directory per test for the files it writes.
class FastaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           (std::string("helix_fasta_") + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& bytes) {
    const std::string path = (dir_ / name).string();
    if (name.ends_with(".gz")) {
      gzFile f = gzopen(path.c_str(), "wb");
      EXPECT_NE(f, nullptr);
      if (!bytes.empty())
        EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
                  static_cast<int>(bytes.size()));
      gzclose(f);
    } else {
      std::ofstream(path, std::ios::binary) << bytes;
    }
    return path;
  }

  static std::vector<FastaRecord> read_all(const std::string& path, const FastaOptions& opt = {},
                                           FastaStats* stats = nullptr) {
    FastaReader reader(path, opt);
    std::vector<FastaRecord> out;
    FastaRecord rec;
    while (reader.next(rec)) out.push_back(rec);
    if (stats) *stats = reader.stats();
    return out;
  }

  // Expects read_all to throw helix::Error whose message contains every piece.
  static void expect_error(const std::string& path, const std::vector<std::string>& pieces,
                           const FastaOptions& opt = {}) {
    try {
      read_all(path, opt);
      ADD_FAILURE() << "expected an error reading " << path;
    } catch (const Error& e) {
      const std::string msg = e.what();
      for (const std::string& p : pieces)
        EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    }
  }

  fs::path dir_;
};

TEST_F(FastaTest, WrappedLinesAndHeaders) {
  const std::string path = write("a.fasta", ">sp|P1|A desc here\nMKT\nAYI\n\nAK\n>b\nLLL");
  const auto recs = read_all(path);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].id, "sp|P1|A");
  EXPECT_EQ(recs[0].header, "sp|P1|A desc here");
  EXPECT_EQ(recs[0].sequence, "MKTAYIAK");
  EXPECT_EQ(recs[0].line, 1);
  EXPECT_EQ(recs[1].id, "b");
  EXPECT_EQ(recs[1].sequence, "LLL");  // last line without a newline
  EXPECT_EQ(recs[1].line, 6);
}

TEST_F(FastaTest, CrlfLowerCaseAndFinalStop) {
  const auto recs = read_all(write("crlf.fa", ">a x\r\nmkT\r\nAY \t*\r\n\r\n>b\r\nWW*\r\n"));
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].header, "a x");
  EXPECT_EQ(recs[0].sequence, "MKTAY");
  EXPECT_EQ(recs[1].sequence, "WW");
}

TEST_F(FastaTest, GzipEqualsPlainAcrossBufferBoundaries) {
  // ~2 MB of random records, wrapped at 60 and at 1000 columns, so lines cross the 256 KiB reads.
  const std::string letters = "LAGVSERTIDPKQNFYMHWCXBUZO";
  std::string text;
  std::vector<std::string> seqs;
  for (uint64_t r = 0; r < 3000; ++r) {
    const size_t n = 1 + philox_u32(5, r, 0) % 1200;
    std::string s;
    for (size_t i = 0; i < n; ++i) s += letters[philox_u32(5, r, i + 1) % letters.size()];
    seqs.push_back(s);
    const size_t wrap = r % 2 ? 60 : 1000;
    text += ">r" + std::to_string(r) + " random\n";
    for (size_t i = 0; i < n; i += wrap) text += s.substr(i, wrap) + "\n";
  }
  const auto plain = read_all(write("big.fasta", text));
  FastaStats stats;
  const auto gz = read_all(write("big.fasta.gz", text), {}, &stats);
  ASSERT_EQ(plain.size(), seqs.size());
  ASSERT_EQ(gz.size(), seqs.size());
  for (size_t r = 0; r < seqs.size(); ++r) {
    EXPECT_EQ(plain[r].sequence, seqs[r]) << r;
    EXPECT_EQ(gz[r].sequence, seqs[r]) << r;
    EXPECT_EQ(gz[r].id, "r" + std::to_string(r));
  }
  EXPECT_EQ(stats.records, 3000);
  EXPECT_EQ(stats.skipped_total(), 0);
}

TEST_F(FastaTest, EmptyFiles) {
  expect_error(write("empty.fasta", ""), {"empty.fasta:1: empty file"});
  expect_error(write("blank.fasta", "\n  \n\t\n"), {"blank.fasta:3: empty file"});
  expect_error(write("empty.fasta.gz", ""), {"empty.fasta.gz:1: empty file"});
  // Empty even in skip mode: there is no record to skip.
  expect_error(write("empty2.fasta", ""), {"empty file"}, {.skip_bad_records = true});
}

TEST_F(FastaTest, BinaryData) {
  expect_error(write("image.fasta", "\x89PNG\r\n\x1a\n\0\0\0\rIHDR"s),
               {"image.fasta:1: binary data (byte 0x89 at column 1)", "is this a FASTA file?",
                "--skip-bad-records"});
  expect_error(write("nul.fasta", ">a\nMKT\nMK\0T\n"s),
               {"nul.fasta:3: binary data: byte 0x00 at column 3 in record 'a'"});
  expect_error(write("hdr.fasta", std::string(">a\x01z\nMKT\n")),
               {"hdr.fasta:1: binary data: byte 0x01 at column 3 of a header line"});
  expect_error(write("high.fasta", ">a\nMK\xC3\xA9T\n"),
               {"high.fasta:2: binary data: byte 0xC3 at column 3"});
}

TEST_F(FastaTest, RecordWithoutSequence) {
  expect_error(write("ns1.fasta", ">a\n>b\nMKT\n"),
               {"ns1.fasta:1: record 'a' has no sequence (followed by another header)"});
  expect_error(write("ns2.fasta", ">a\nMKT\n>b desc\n\n"),
               {"ns2.fasta:3: record 'b' has no sequence (followed by the end of the file)"});
  expect_error(write("ns3.fasta", ">a\nMKT\n>b\n*\n"), {"ns3.fasta:3: record 'b' has no sequence"});
}

TEST_F(FastaTest, CharactersOutsideTheAlphabet) {
  expect_error(
      write("digit.fasta", ">a\nMKT\nMK1T\n"),
      {"digit.fasta:3: character '1' at column 3 in record 'a' is outside the ESM alphabet"});
  expect_error(write("j.fasta", ">x\nMJ\n"), {"j.fasta:2: character 'J' at column 2"});
  expect_error(write("stop.fasta", ">a\nMK*\nT\n"),
               {"stop.fasta:3: residue 'T' at column 1 in record 'a' follows a '*'"});
  expect_error(write("stop2.fasta", ">a\nMK**\n"), {"stop2.fasta:2: character '*' at column 4"});
}

TEST_F(FastaTest, TooLong) {
  // The default limit, 1 MiB per line: a 3 MiB line stops after 1 MiB, the rest is never held.
  const std::string huge = ">a\n" + std::string(3u << 20, 'A') + "\n";
  expect_error(write("huge.fasta.gz", huge),
               {"huge.fasta.gz:2: line longer than 1048576 bytes (max_line_bytes)"});
  expect_error(write("line.fasta", ">a\n" + std::string(40, 'A') + "\n"),
               {"line.fasta:2: line longer than 16 bytes"}, {.max_line_bytes = 16});
  expect_error(write("hline.fasta", ">" + std::string(40, 'h') + "\nMKT\n"),
               {"hline.fasta:1: header line longer than 16 bytes"}, {.max_line_bytes = 16});
  expect_error(write("rec.fasta", ">a\nAAAAAA\nAAAAAA\nAAAAAA\n"),
               {"rec.fasta:3: record 'a' (header on line 1) has more than 10 residues"},
               {.max_record_residues = 10});
  // Exactly at the limits is fine (a "\r\n" line end does not count).
  FastaOptions opt{.max_line_bytes = 6, .max_record_residues = 12};
  const auto recs = read_all(write("edge.fasta", ">abcde\r\nAAAAAA\r\nAAAAAA\r\n"), opt);
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].sequence.size(), 12u);
}

TEST_F(FastaTest, HeaderProblems) {
  expect_error(write("noid.fasta", ">\nMKT\n"), {"noid.fasta:1: header line with no id"});
  expect_error(write("noid2.fasta", "> desc\nMKT\n"), {"noid2.fasta:1: header line with no id"});
  expect_error(write("nohdr.fasta", "\nMKT\n>a\nMKT\n"),
               {"nohdr.fasta:2: expected a '>' header line, got 'MKT'"});
}

TEST_F(FastaTest, UnreadableFiles) {
  expect_error((dir_ / "missing.fasta").string(), {"missing.fasta: cannot open"});
  expect_error(dir_.string(), {"expected a FASTA file, got a directory"});
  // A truncated .gz stops even in skip mode: damaged data is not a bad record.
  std::string text;
  for (int r = 0; r < 2000; ++r)
    text += ">r" + std::to_string(r) + "\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n";
  const std::string path = write("cut.fasta.gz", text);
  const auto size = fs::file_size(path);
  fs::resize_file(path, size / 2);
  expect_error(path, {"cut.fasta.gz:", "cannot read the file"}, {.skip_bad_records = true});
}

TEST_F(FastaTest, SkipModeCountsEachKind) {
  const std::string text = std::string("junk before the first header\n") +  // no header, line 1
                           ">good1\nMKT\n" +                                // good
                           ">nul\nMK" + std::string(1, '\0') + "T\n" +      // binary
                           ">noseq\n" +                                     // no sequence
                           ">digit\nMK1\nMKT\n" +                           // bad character
                           ">long\n" + std::string(40, 'A') + "\n" +        // too long
                           ">\nMKT\n" +                                     // no id
                           ">good2 two\nLLL\nAA\n";                         // good
  FastaStats stats;
  const auto recs = read_all(write("mixed.fasta", text),
                             {.skip_bad_records = true, .max_line_bytes = 32}, &stats);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].id, "good1");
  EXPECT_EQ(recs[1].id, "good2");
  EXPECT_EQ(recs[1].sequence, "LLLAA");
  EXPECT_EQ(recs[1].line, 14);
  auto count = [&](FastaProblem p) { return stats.skipped[static_cast<size_t>(p)]; };
  EXPECT_EQ(count(FastaProblem::kNoHeader), 1);
  EXPECT_EQ(count(FastaProblem::kBinary), 1);
  EXPECT_EQ(count(FastaProblem::kNoSequence), 1);
  EXPECT_EQ(count(FastaProblem::kBadCharacter), 1);
  EXPECT_EQ(count(FastaProblem::kTooLong), 1);
  EXPECT_EQ(count(FastaProblem::kNoId), 1);
  EXPECT_EQ(stats.skipped_total(), 6);
  EXPECT_EQ(stats.records, 2);
  EXPECT_EQ(stats.residues, 8);
  EXPECT_NE(stats.first_problem.find("mixed.fasta:1: expected a '>' header line"),
            std::string::npos)
      << stats.first_problem;
  EXPECT_NE(
      stats.skipped_summary().find(
          "6 records skipped: 1 binary data, 1 no sequence, 1 character outside the alphabet, "
          "1 too long, 1 no id, 1 no header; first: "),
      std::string::npos)
      << stats.skipped_summary();
  // Strict mode stops at the first of them.
  expect_error(write("mixed2.fasta", text), {"mixed2.fasta:1: expected a '>' header line"});
}

TEST_F(FastaTest, DatasetFromFasta) {
  const std::string path = write("d.fasta.gz", ">a\nMKT\n>b\nlag\nV\n>c\nW\n");
  const ProteinDataset data = ProteinDataset::from_fasta(path);
  ASSERT_EQ(data.size(), 3);
  EXPECT_EQ(data.length(1), 4);
  const auto r = data.residues(1);
  EXPECT_EQ(std::vector<uint8_t>(r.begin(), r.end()),
            (std::vector<uint8_t>{4, 5, 6, 7}));  // L A G V
  EXPECT_EQ(data.total_residues(), 8);
  EXPECT_EQ(data.max_length(), 4);
  EXPECT_EQ(data.id_hash(2), hash_record_id("c"));
  // Every record bad: the dataset refuses, naming the file and the counts.
  const std::string bad = write("bad.fasta", ">a\nMK1\n>b\n");
  try {
    ProteinDataset::from_fasta(bad, {.skip_bad_records = true});
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(
        msg.find("bad.fasta: expected at least one good FASTA record, got none (2 records skipped: "
                 "1 no sequence, 1 character outside the alphabet"),
        std::string::npos)
        << msg;
  }
}

}  // namespace
}  // namespace helix
