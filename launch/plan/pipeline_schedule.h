#pragma once
// Pipeline-parallel schedules as `helix plan` models them: the closed-form bubble and activation
// in-flight counts of 1F1B and interleaved 1F1B, and a brute-force timeline simulation of the same
// schedules (the per-stage op order of Megatron-LM's schedules, run event by event) that the tests
// hold the formulas against.
#include <cstdint>
#include <string>
#include <vector>

namespace helix {

struct PipelineShape {
  int stages = 1;          // p: pipeline ranks
  int virtual_stages = 1;  // v: model chunks per rank (1: plain 1F1B)
  int micro_batches = 1;   // m
};

// Checks the schedule's rules (p, v, m >= 1; interleaving needs p > 1 and m % p == 0); returns an
// empty string when valid, else the rule that fails.
std::string pipeline_shape_error(const PipelineShape& s);

// Step time in units of one micro-batch's forward + backward through one whole stage (all v
// chunks): (m + (p - 1) / v). With tf, tb the forward and backward times of a stage, the step takes
// (m + (p-1)/v) * (tf + tb): every stage is busy m * (tf + tb) and idles (p-1)(tf+tb)/v.
double pipeline_step_units(const PipelineShape& s);
// Idle share of the step: (p - 1) / (v * m + p - 1).
double pipeline_bubble_fraction(const PipelineShape& s);
// Most micro-batches whose activations stage `stage` holds at once, in whole-stage units (a chunk
// counts 1/v): 1F1B min(p - stage, m); interleaved min(2(p - stage - 1) + (v-1)p + 1, m v) / v (its
// warm-up forwards plus the one in flight). Stage 0 holds the most: p, or p + (p - 1) / v.
double pipeline_in_flight(const PipelineShape& s, int stage);
inline double pipeline_stage0_in_flight(const PipelineShape& s) { return pipeline_in_flight(s, 0); }

struct PipelineSimResult {
  double makespan = 0;  // time of the last op's end
  double max_in_flight_stage0 =
      0;  // chunks forwarded but not yet backwarded on stage 0, divided by v
  std::vector<double> max_in_flight;  // the same for every stage
  double busy_per_stage = 0;          // m * v * (tf + tb) / v
};
// Simulates the schedule with per-chunk forward time tf / v and backward time tb / v (tf, tb: one
// whole stage), no communication latency: each stage runs its op list in order, an op starts when
// its stage is free and its dependency (previous virtual stage's forward, next virtual stage's
// backward) has ended.
PipelineSimResult simulate_pipeline(const PipelineShape& s, double tf, double tb);

}  // namespace helix
