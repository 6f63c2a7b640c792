// main() of the multi-rank test binary: MPI up, gtest's full output on rank 0 only, other ranks
// print only their failures prefixed with "[rank r]", and every rank exits with the worst result of
// all.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

#include "parallel/mpi_communicator.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      failed_.push_back(std::string(info.test_suite_name()) + "." + info.name());
  }
  void OnTestProgramEnd(const ::testing::UnitTest&) override {
    for (const std::string& f : failed_)
      std::fprintf(stderr, "[rank %d] FAILED %s\n", rank_, f.c_str());
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::vector<std::string> failed_;
};

}  // namespace

int main(int argc, char** argv) {
  helix::MpiSession mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (mpi.world_rank() != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(mpi.world_rank()));
  }
  const int rc = RUN_ALL_TESTS();
  int worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (mpi.world_rank() == 0)
    std::printf("[helix] %d ranks: %s\n", mpi.world_size(),
                worst ? "FAILED on some rank" : "all passed");
  return worst;
}
