// The --fp8* flags of `helix train`: parsed into the recipe, and every bad value stopped with one
// line naming its flag (before any work).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "launch/fp8_setup.h"
#include "launch/train_options.h"

namespace helix {
namespace {

TrainOptions parse(std::vector<std::string> extra) {
  std::vector<std::string> args{"--data", "x.fasta", "--model", "esm2-8m"};
  args.insert(args.end(), extra.begin(), extra.end());
  TrainOptions o;
  parse_train_options(args, o);
  return o;
}

void expect_refused(std::vector<std::string> extra, const std::string& needle) {
  try {
    parse(extra);
    ADD_FAILURE() << "accepted, expected an error naming " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Fp8Options, DefaultsAndRecipe) {
  const TrainOptions d = parse({});
  EXPECT_EQ(d.fp8, "none");
  const TrainOptions o = parse({"--fp8", "delayed", "--fp8-format", "e4m3", "--amax-history", "16", "--amax-algo",
                                "most_recent", "--fp8-margin", "2", "--fp8-amax-group", "tp"});
  const Fp8Recipe r = fp8_recipe_of(o);
  EXPECT_EQ(r.format, Fp8FormatRecipe::kE4M3);
  EXPECT_EQ(r.amax_history_len, 16);
  EXPECT_EQ(r.amax_algo, Fp8AmaxAlgo::kMostRecent);
  EXPECT_EQ(r.margin, 2);
  EXPECT_EQ(r.amax_group, Fp8AmaxGroup::kTp);
  const Fp8Recipe def = fp8_recipe_of(parse({"--fp8", "delayed"}));
  EXPECT_EQ(def.format, Fp8FormatRecipe::kHybrid);
  EXPECT_EQ(def.amax_history_len, 1024);
  EXPECT_EQ(def.amax_group, Fp8AmaxGroup::kTpCpDp);
}

TEST(Fp8Options, BadValuesNameTheFlag) {
  expect_refused({"--fp8", "current"}, "--fp8: expected none or delayed");
  expect_refused({"--fp8", "delayed", "--fp8-format", "e5m2"}, "--fp8-format");
  expect_refused({"--fp8", "delayed", "--amax-history", "0"}, "--amax-history");
  expect_refused({"--fp8", "delayed", "--amax-algo", "mean"}, "--amax-algo");
  expect_refused({"--fp8", "delayed", "--fp8-margin", "-1"}, "--fp8-margin");
  expect_refused({"--fp8", "delayed", "--fp8-amax-group", "dp"}, "--fp8-amax-group");
  expect_refused({"--fp8", "delayed", "--hidden", "328", "--heads", "4"}, "--fp8 delayed: expected hidden (328)");
}

}  // namespace
}  // namespace helix
