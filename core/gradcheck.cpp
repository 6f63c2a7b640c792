#include "core/gradcheck.h"

#include <cmath>

#include "core/philox.h"

namespace helix {
namespace {

double get(const Tensor& t, int64_t i) { return cpu_value(t, i); }
void set(Tensor& t, int64_t i, double v) {
  if (t.dtype() == DType::kF64) t.data<double>()[i] = v;
  else t.data<float>()[i] = static_cast<float>(v);
}

// Forward of a fresh node without recording (the perturbed evaluations).
std::vector<Tensor> run_forward(const NodeFactory& make, const std::vector<Tensor>& in) {
  TapeOptions quiet;
  quiet.record = false;
  Tape tape(quiet);
  std::vector<Var> vars;
  for (const Tensor& t : in) vars.push_back(Var::leaf(t, false));
  std::vector<Tensor> out;
  for (const Var& v : tape.apply(make(), vars)) out.push_back(v.data());
  return out;
}

double projected_loss(const std::vector<Tensor>& out, const std::vector<Tensor>& w) {
  double l = 0;
  for (size_t o = 0; o < out.size(); ++o)
    for (int64_t j = 0; j < out[o].numel(); ++j) l += get(w[o], j) * get(out[o], j);
  return l;
}

}  // namespace

GradCheckResult check_gradients(const NodeFactory& make_node, const std::vector<Tensor>& inputs,
                                const std::vector<bool>& needs_grad, GradCheckOptions opts) {
  HELIX_CHECK(inputs.size() == needs_grad.size(), "check_gradients: {} inputs, {} needs_grad flags",
              inputs.size(), needs_grad.size());
  bool f64 = true;
  for (const Tensor& t : inputs) {
    HELIX_CHECK(t.is_cpu(), "check_gradients runs on the CPU; got {}", t.str());
    if (dtype_is_float(t.dtype())) f64 = f64 && t.dtype() == DType::kF64;
  }
  if (opts.eps == 0) opts.eps = f64 ? 1e-6 : 1e-2;
  if (opts.rtol == 0) opts.rtol = f64 ? 1e-6 : 2e-2;
  if (opts.atol == 0) opts.atol = f64 ? 1e-8 : 2e-3;

  // Analytic gradients through the node contract, with a Tape-like call sequence.
  std::shared_ptr<Node> node = make_node();
  std::vector<Tensor> in(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) in[i] = inputs[i].clone();
  Tape tape;
  std::vector<Var> vars;
  for (size_t i = 0; i < in.size(); ++i) vars.push_back(Var::leaf(in[i], needs_grad[i]));
  std::vector<Var> outs = tape.apply(node, vars);
  std::vector<Tensor> out(outs.size()), w(outs.size());
  for (size_t o = 0; o < outs.size(); ++o) {
    out[o] = outs[o].data();
    w[o] = Tensor::empty(out[o].shape(), out[o].dtype());
    for (int64_t j = 0; j < w[o].numel(); ++j) {
      const double v = 2.0 * u32_to_uniform(philox_u32(opts.seed, 1000 + o, static_cast<uint64_t>(j))) - 1.0;
      set(w[o], j, v);
    }
  }
  // Pre-load every gradient buffer with 0.5 to check accumulation (+=) rather than overwrite.
  constexpr double kPreload = 0.5;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!needs_grad[i]) continue;
    Tensor g = Tensor::empty(in[i].shape(), in[i].dtype());
    g.fill(kPreload);
    vars[i].cell()->grad = g;
  }
  std::vector<Tensor> seeds;
  for (auto& t : w) seeds.push_back(t);
  tape.backward(outs, seeds);

  GradCheckResult res;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!needs_grad[i]) continue;
    const Tensor& g = vars[i].grad();
    const int64_t n = in[i].numel();
    const int probes = static_cast<int>(std::min<int64_t>(n, opts.max_checks_per_input));
    for (int p = 0; p < probes; ++p) {
      const int64_t k = probes == n ? p : static_cast<int64_t>(philox_u32(opts.seed, 77 + i, p) % n);
      const double x = get(in[i], k);
      const double h = opts.eps * std::max(1.0, std::abs(x));
      std::vector<Tensor> pert(in.size());
      for (size_t j = 0; j < in.size(); ++j) pert[j] = inputs[j].clone();
      set(pert[i], k, x + h);
      const double xp = get(pert[i], k);
      const double lp = projected_loss(run_forward(make_node, pert), w);
      set(pert[i], k, x - h);
      const double xm = get(pert[i], k);
      const double lm = projected_loss(run_forward(make_node, pert), w);
      const double numeric = (lp - lm) / (xp - xm);
      const double analytic = get(g, k) - kPreload;
      const double err = std::abs(numeric - analytic);
      res.max_abs_err = std::max(res.max_abs_err, err);
      res.checked++;
      if (err > opts.atol + opts.rtol * std::max(std::abs(numeric), std::abs(analytic)) && res.ok) {
        res.ok = false;
        res.message = fmt::format(
            "node '{}': gradient of input {} at element {}: analytic {:.8g}, numeric {:.8g} (|diff| {:.3g})",
            node->name(), i, k, analytic, numeric, err);
      }
    }
  }
  return res;
}

}  // namespace helix
