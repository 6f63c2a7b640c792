#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/json.h"
#include "launch/metrics.h"

namespace helix {
namespace {

TEST(Metrics, JsonlRecordsAndProgressLine) {
  const std::string path = (std::filesystem::temp_directory_path() / "helix_metrics_test.jsonl").string();
  StepMetrics m;
  m.step = 3;
  m.loss = 2.5;
  m.tokens = 1000;
  m.step_seconds = 0.5;
  m.model_flops = 4e12;
  m.peak_flops = 1e13;
  {
    MetricsWriter w(path);
    w.write(m);
    m.loss = std::nan("");
    m.skipped = true;
    m.skipped_total = 1;
    w.write(m);
    w.write(EvalMetrics{.step = 3, .loss = std::log(8.0), .tokens = 10});
  }
  std::ifstream in(path);
  std::string l1, l2, l3;
  std::getline(in, l1);
  std::getline(in, l2);
  std::getline(in, l3);
  const Json a = Json::parse(l1), b = Json::parse(l2), c = Json::parse(l3);
  EXPECT_EQ(a.at("step").as_int(), 3);
  EXPECT_DOUBLE_EQ(a.at("tokens_per_second").as_double(), 2000.0);
  EXPECT_DOUBLE_EQ(a.at("tflops").as_double(), 8.0);
  EXPECT_DOUBLE_EQ(a.at("mfu").as_double(), 0.8);
  EXPECT_TRUE(b.at("loss").is_null());  // NaN is written as null, the file stays valid JSON
  EXPECT_TRUE(b.at("skipped").as_bool());
  EXPECT_NEAR(c.at("perplexity").as_double(), 8.0, 1e-12);
  EXPECT_NE(progress_line(m, 10).find("SKIPPED"), std::string::npos);
  EXPECT_NEAR(device_peak_bf16_flops(90, 132) / 1e12, 989.4, 0.5);
}

}  // namespace
}  // namespace helix
