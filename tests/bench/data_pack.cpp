// helix_bench_data_pack: host time per training step spent building batches, as `helix train` does
// it before any GPU work of the step (launch/trainer.cpp: DataLoader::next(), i.e. crop, MLM
// masking and THD packing). `helix plan` adds this as the per-step host overhead (host_step_ms of
// the calibration file); run it on the GPU machine's host to calibrate that machine.
//   helix_bench_data_pack [fasta=examples/data/swissprot_3k.fasta.gz] [tokens=16384] [steps=200]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "launch/data/dataset.h"
#include "launch/data/loader.h"

int main(int argc, char** argv) {
  using namespace helix;
  const std::string fasta = argc > 1 ? argv[1] : "examples/data/swissprot_3k.fasta.gz";
  const int64_t tokens = argc > 2 ? std::atoll(argv[2]) : 16384;
  const int steps = argc > 3 ? std::atoi(argv[3]) : 200;
  try {
    auto data = std::make_shared<ProteinDataset>(ProteinDataset::from_fasta(fasta, FastaOptions{}));
    std::vector<int64_t> idx = split_indices(
        *data, Split::kTrain, SplitOptions{.validation_fraction = 0.01, .split_seed = 0});
    DataLoaderOptions lo;
    lo.seed = 1;
    lo.packing.tokens_per_batch = tokens;
    DataLoader loader(data, idx, lo);
    for (int i = 0; i < 5; ++i) loader.next();
    int64_t real = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) real += loader.next().num_tokens;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("data packing: %d steps of %lld tokens (%.0f real on average): %.3f ms per step\n",
                steps, static_cast<long long>(tokens), double(real) / steps, 1e3 * s / steps);
    std::printf("{\"bench\": \"data_pack\", \"tokens\": %lld, \"host_step_ms\": %.4f}\n",
                static_cast<long long>(tokens), 1e3 * s / steps);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helix_bench_data_pack: %s\n", e.what());
    return 1;
  }
  return 0;
}
