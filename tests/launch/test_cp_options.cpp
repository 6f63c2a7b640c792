// `helix train` context-parallel flags: defaults, parsing, and bad values refused naming the flag.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "launch/train_options.h"

namespace helix {
namespace {

std::vector<std::string> args(std::vector<std::string> extra) {
  std::vector<std::string> a{"--data", "x.fasta"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

void expect_refused(const std::vector<std::string>& extra, const std::string& flag) {
  TrainOptions o;
  try {
    parse_train_options(args(extra), o);
    ADD_FAILURE() << "expected a refusal naming " << flag;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
  }
}

TEST(CpOptions, DefaultsAndParsing) {
  TrainOptions o;
  ASSERT_TRUE(parse_train_options(args({}), o));
  EXPECT_EQ(o.cp, 1);
  EXPECT_EQ(o.cp_comm, "ring");
  EXPECT_EQ(o.cp_split_min_len, kDefaultCpSplitMinLen);
  TrainOptions p;
  ASSERT_TRUE(parse_train_options(
      args({"--cp", "4", "--cp-comm", "all-gather", "--cp-split-min-len", "0"}), p));
  EXPECT_EQ(p.cp, 4);
  EXPECT_EQ(parse_cp_comm(p.cp_comm), CpComm::kAllGather);
  EXPECT_EQ(p.cp_split_min_len, 0);
}

TEST(CpOptions, BadValuesNameTheFlag) {
  expect_refused({"--cp", "0"}, "--cp:");
  expect_refused({"--cp-comm", "p2p"}, "--cp-comm");
  expect_refused({"--cp-split-min-len", "-1"}, "--cp-split-min-len");
}

}  // namespace
}  // namespace helix
