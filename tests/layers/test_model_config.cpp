#include <gtest/gtest.h>

#include "core/error.h"
#include "layers/model_config.h"

namespace helix {
namespace {

TEST(ModelConfig, PublishedParameterCounts) {
  // Sum over the Hugging Face EsmForMaskedLM tensors of esm2-8m (tied decoder once; rotary has no
  // position-embedding table; the contact head is not part of the masked-LM model here).
  const int64_t h = 320, f = 1280, v = 33;
  const int64_t per_layer = 3 * (h * h + h) + (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h;
  EXPECT_EQ(model_config("esm2-8m").num_params(), v * h + 6 * per_layer + 2 * h + (h * h + h) + 2 * h + v);
  EXPECT_EQ(model_config("esm2-8m").num_params(), 7'512'353);
  EXPECT_NEAR(model_config("esm2-650m").num_params() / 1e6, 651.0, 1.0);
  EXPECT_NEAR(model_config("esm2-3b").num_params() / 1e9, 2.84, 0.01);
  EXPECT_NEAR(model_config("esm2-15b").num_params() / 1e9, 15.1, 0.1);
  EXPECT_NEAR(model_config("esm3-98b").num_params() / 1e9, 97.9, 0.5);
  EXPECT_EQ(model_config("esm2-650m").head_dim(), 64);
  EXPECT_EQ(model_config("esm2-15b").head_dim(), 128);
  for (const std::string& n : model_config_names()) EXPECT_NO_THROW(model_config(n).validate()) << n;
}

TEST(ModelConfig, TrainFlops) {
  ModelConfig c = model_config("esm2-8m");
  const double f = c.train_flops({100, 50});
  EXPECT_DOUBLE_EQ(f, 6.0 * c.num_matmul_params() * 150 + 12.0 * 320 * 6 * (100.0 * 100 + 50.0 * 50));
}

TEST(ModelConfig, Errors) {
  try {
    model_config("esm2-7b");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--model: unknown model 'esm2-7b'"), std::string::npos) << e.what();
  }
  ModelConfig c = model_config("esm2-8m");
  c.heads = 7;
  EXPECT_THROW(c.validate(), Error);
}

}  // namespace
}  // namespace helix
