#include "launch/cli.h"

#include <boost/program_options.hpp>
#include <iostream>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/error.h"
#include "launch/plan/plan_cli.h"
#include "launch/trainer.h"

namespace po = boost::program_options;

namespace helix {
namespace {

constexpr const char* kUsage =
    "usage: helix [--version] [--help] <command> [options]\n"
    "\n"
    "commands:\n"
    "  train    train an ESM-2 masked language model on a FASTA file\n"
    "  info     print the build configuration and the devices helix can use\n"
    "  plan     predict memory, communication and step time of a parallel layout (or --search)\n"
    "\n"
    "Run `helix <command> --help` for the options of a command.\n";

int cmd_info(const std::vector<std::string>& args) {
  po::options_description desc("helix info options");
  desc.add_options()("help,h", "show this help");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).run(), vm);
  if (vm.count("help")) {
    std::cout << "usage: helix info\n\n" << desc;
    return 0;
  }
  std::cout << "helix " << HELIX_VERSION << "\n";
  std::cout << "cuda backend: " << (HELIX_WITH_CUDA ? "built" : "not built") << "\n";
  const int n = cuda_device_count();
  if (n == 0) std::cout << "cuda devices: none (" << cuda_unavailable_reason() << "); running on the CPU\n";
  for (int i = 0; i < n; ++i) {
    const int cc = cuda_compute_capability(i);
    std::cout << "cuda:" << i << " compute capability " << cc / 10 << "." << cc % 10
              << (cc >= 89 ? " (fp8 tensor cores)" : "") << "\n";
  }
  return 0;
}

}  // namespace

int run_cli(int argc, char** argv) {
  po::options_description top("options");
  top.add_options()("help,h", "show this help")("version", "print the version");
  po::options_description hidden;
  hidden.add_options()("command", po::value<std::string>(), "")(
      "args", po::value<std::vector<std::string>>(), "");
  po::positional_options_description pos;
  pos.add("command", 1).add("args", -1);
  po::options_description all;
  all.add(top).add(hidden);
  po::variables_map vm;
  po::parsed_options parsed =
      po::command_line_parser(argc, argv).options(all).positional(pos).allow_unregistered().run();
  po::store(parsed, vm);

  if (vm.count("version")) {
    std::cout << "helix " << HELIX_VERSION << (HELIX_WITH_CUDA ? " (cuda)" : " (cpu only)") << "\n";
    return 0;
  }
  if (!vm.count("command")) {
    std::cout << kUsage << "\n" << top;
    return vm.count("help") ? 0 : 1;
  }
  const std::string cmd = vm["command"].as<std::string>();
  std::vector<std::string> rest = po::collect_unrecognized(parsed.options, po::include_positional);
  rest.erase(rest.begin());  // the command itself
  if (vm.count("help")) rest.push_back("--help");  // `helix <command> --help`: the command's help
  if (cmd == "info") return cmd_info(rest);
  if (cmd == "plan") return cmd_plan(rest);
  if (cmd == "train") {
    TrainOptions o;
    if (!parse_train_options(rest, o)) return 0;
    const TrainSummary s = run_train(o);
    return s.steps == o.steps ? 0 : 1;
  }
  HELIX_FAIL("unknown command '{}' (known: train, info, plan); run `helix --help`", cmd);
}

}  // namespace helix
