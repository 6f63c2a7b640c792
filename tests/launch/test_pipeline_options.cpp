// `helix train` pipeline flags (launch/pipeline_step.h): --pp-layers parsing, the split and stage
// ranges the trainer builds, and one-line refusals of impossible combinations naming the flag.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "launch/pipeline_step.h"
#include "launch/plan/pipeline_schedule.h"
#include "launch/train_options.h"
#include "parallel/pipeline_schedule.h"

namespace helix {
namespace {

TrainOptions parse(std::vector<std::string> extra) {
  std::vector<std::string> args{"--data",         "x.fasta", "--model",           "esm2-650m",
                                "--max-residues", "126",     "--tokens-per-step", "4096"};
  args.insert(args.end(), extra.begin(), extra.end());
  TrainOptions o;
  EXPECT_TRUE(parse_train_options(args, o));
  return o;
}

void expect_refused(std::vector<std::string> extra, const std::string& needle) {
  try {
    parse(std::move(extra));
    ADD_FAILURE() << "expected a refusal mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(PipelineOptions, ParsesLayersAndSplits) {
  EXPECT_EQ(parse_pp_layers("9,8,8,8"), (std::vector<int>{9, 8, 8, 8}));
  const TrainOptions given = parse({"--pp", "4", "--pp-layers", "9,8,8,8", "--micro-batches", "8"});
  EXPECT_EQ(pipeline_split(given), (std::vector<int>{9, 8, 8, 8}));
  // ESM-2 650M: 33 layers, the LM head costed on the last stage -> the extra layer goes first.
  const TrainOptions balanced = parse({"--pp", "4", "--micro-batches", "8"});
  EXPECT_EQ(pipeline_split(balanced), (std::vector<int>{9, 8, 8, 8}));
  const TrainOptions inter = parse({"--pp", "2", "--pp-virtual", "2", "--micro-batches", "4"});
  EXPECT_EQ(pipeline_split(inter), (std::vector<int>{9, 8, 8, 8}));
  EXPECT_NE(describe_pipeline(inter).find("interleaved"), std::string::npos);
}

TEST(PipelineOptions, BadCombinationsRefusedNamingTheFlag) {
  expect_refused({"--pp", "4", "--pp-layers", "9,8,8,7"}, "--pp-layers");
  expect_refused({"--pp", "4", "--pp-layers", "9,8,8"}, "--pp-layers");
  expect_refused({"--pp", "4", "--pp-layers", "9,8,x,8"}, "--pp-layers");
  expect_refused({"--pp", "2", "--pp-virtual", "2", "--micro-batches", "3"}, "--micro-batches");
  expect_refused({"--pp-virtual", "2"}, "--pp");
  expect_refused({"--pp-layers", "33"}, "--pp");
  expect_refused({"--pp", "0"}, "--pp");
  expect_refused({"--pp", "4", "--layers", "3"}, "--pp 4");
  expect_refused({"--pp", "4", "--pp-virtual", "9", "--micro-batches", "4"}, "--pp-virtual 9");
  expect_refused({"--pp", "2", "--cp", "2", "--fp8", "delayed"}, "--cp 2 with --pp 2 and --fp8");
  expect_refused({"--pp", "2", "--cp", "2", "--zero", "1"}, "--cp 2 with --pp 2 and --zero 1");
  EXPECT_NO_THROW(parse({"--pp", "2", "--cp", "2"}));  // composes (mpi_test_cp_pp.cpp)
  EXPECT_NO_THROW(parse({"--pp", "2", "--fp8", "delayed"}));  // composes (mpi_test_fp8_pp.cpp)
}

// `helix plan`'s closed-form bubble (launch/plan/pipeline_schedule.h) against the timeline of the
// schedules the trainer runs (parallel/pipeline_schedule.h): equal for every shape with forward =
// backward, and for 1F1B with backward = 2 forward.
TEST(PipelineOptions, PlannerBubbleMatchesTheExecutedSchedule) {
  for (int p : {2, 3, 4, 8})
    for (int v : {1, 2, 3})
      for (int m : {p, 2 * p, 4 * p}) {
        const PipelineScheduleParams sp{.stages = p, .virtual_stages = v, .micro_batches = m};
        const double plan = pipeline_bubble_fraction(PipelineShape{p, v, m});
        EXPECT_NEAR(pipeline_bubble_fraction(sp, PipelineCosts{.forward = 1, .backward = 1}), plan,
                    1e-12)
            << p << " " << v << " " << m;
        if (v == 1) EXPECT_NEAR(pipeline_bubble_fraction(sp), plan, 1e-12) << p << " " << m;
      }
}

}  // namespace
}  // namespace helix
