#pragma once
// Packed-sequence (THD) helpers shared by the CPU references and the kernels: which sequence of
// cu_seqlens [b+1] holds token t. Tokens at or past cu_seqlens[b] (padding) belong to a trailing
// segment b that starts at cu_seqlens[b].
#include <cstdint>

#include "core/convert.h"  // HELIX_HD

namespace helix::thd {

// The largest i in [0, num_seqs] with cu[i] <= t (cu[0] = 0 <= t assumed); with empty sequences
// (equal entries) the last of them, whose start equals the real one's.
HELIX_HD int64_t sequence_of(const int32_t* cu, int64_t num_seqs, int64_t t) {
  int64_t lo = 0, hi = num_seqs;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace helix::thd
