// What bounds an element-wise optimizer step on a CPU: the bytes it moves through memory.
// A model of the bytes mdopt's passes move per step for each preset (counted from the
// passes, not measured), and the machine's memory bandwidth measured on a stream kernel
// with the same access pattern, so that a step time can be set against its floor.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_MEMORY_TRAFFIC_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_MEMORY_TRAFFIC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "model_shapes.h"
#include "preset_groups.h"

namespace mdopt_bench {

// Bytes one step of the fast engine reads and writes in memory on one rank, element-wise
// passes only (Newton-Schulz's products are left out: their traffic depends on the BLAS's
// blocking), as if every pass streamed from and to DRAM: the finite check reads G; the Adam
// pass reads W, G, m, v and writes m, v, W; a projected or gained group adds the finishing
// pass (read and write W); Muon's pass 1 reads G and the momentum (and W with gains) and
// writes the momentum and X (X is not read first, so its lines are also read: write-allocate),
// pass 2 reads W and O and writes W. bf16 weights add the f32 master's separate model copy
// (2 B written, 2 B read by write-allocate, per pass that writes W). What the caches keep
// between passes only lowers the real figure. param_bytes and grad_bytes: 4 (f32) or 2 (bf16).
int64_t ModelStepBytes(const PresetGrouping& preset, const std::vector<TensorShape>& shapes,
                       int param_bytes, int grad_bytes);

struct StreamBandwidth {
  double inplace_gbps = 0.0;  // 4 arrays read, 3 of them written back in place: 28 B/element
  double triad_gbps = 0.0;    // STREAM triad a = b + s c, counted as STREAM does (24 B/element)
  int64_t elements = 0;       // per array
  int threads = 0;
};

// Median of `reps` runs of each kernel over arrays of `elements` floats on `threads` threads
// (std::thread, each on its own contiguous block, first-touched by that thread).
StreamBandwidth MeasureStream(int64_t elements, int threads, int reps);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_MEMORY_TRAFFIC_H_
