// mdopt-cuda-bench: Newton-Schulz alone, on the CUDA backend's runner
// (kernels/cuda/newton_schulz.h), over the GPT-shaped set of DESIGN.md section 8 (d=2048,
// 8 layers, ffn 4x: q, k, v, o, fc1, fc2 per layer): one batch per shape, 5 quintic steps,
// bf16 products, one runner and one workspace for every shape (as the backend holds them).
// The form is the backend's default (auto: Gram for fc1 and fc2, aspect 4); the standard
// form on every shape is timed too. The steps of the whole optimizer are benchmarked
// through the library by optimizer_bench.py; torch's bf16 Newton-Schulz on the same shapes
// by torch_baselines.py / optimizer_bench.py (DESIGN.md goal: <= 0.6x its time).
// Prints one JSON object: times, achieved TFLOP/s (NewtonSchulzRunner::Flops: every product
// a full GEMM), per shape too, and with --torch-ns-ms the ratio against torch.
//
//   mdopt-cuda-bench [--d 2048] [--layers 8] [--steps 5] [--warmup 3] [--iters 10]
//                    [--torch-ns-ms <torch's bf16 NS over the same matrices, ms>]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common/ns_coeffs.h"
#include "kernels/cuda/device_status.h"
#include "kernels/cuda/newton_schulz.h"

namespace cu = mdopt::kernels::cuda;
using mdopt::kernels::NsCoeffSet;
using mdopt::kernels::NsForm;

namespace {

#define CHECK_CUDA(call)                                                                  \
  do {                                                                                    \
    const cudaError_t e_ = (call);                                                        \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_));                    \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)
#define CHECK_OK(expr)                                                                    \
  do {                                                                                    \
    const cu::DeviceStatus s_ = (expr);                                                   \
    if (!s_.ok()) {                                                                       \
      std::fprintf(stderr, "%s: %s\n", #expr, s_.message().c_str());                      \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

struct Shape {
  int64_t m, n;
};

// The order of torch_baselines.py's shapes().
std::vector<Shape> GptShapes(int64_t d, int layers) {
  std::vector<Shape> s;
  for (int l = 0; l < layers; ++l) {
    for (int k = 0; k < 4; ++k) s.push_back({d, d});  // q, k, v, o
    s.push_back({4 * d, d});                         // fc1
    s.push_back({d, 4 * d});                         // fc2
  }
  return s;
}

// Uniform in [-scale sqrt(3), scale sqrt(3)] (standard deviation `scale`) from a
// splitmix64 stream: hundreds of millions of values in seconds, not minutes.
void FillRandom(std::vector<float>* h, float scale, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  const float k = scale * 1.7320508f / 8388608.0f;
  for (float& v : *h) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    v = (static_cast<float>(static_cast<int32_t>(z >> 40) - 8388608)) * k;
  }
}

struct Timing {
  double mean_ms = 0, min_ms = 0;
};

template <typename Fn>
Timing Time(int warmup, int iters, Fn&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  Timing t;
  t.min_ms = 1e30;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.mean_ms += ms / iters;
    t.min_ms = std::min<double>(t.min_ms, ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return t;
}

// One batch of same-shape matrices on the device.
struct Group {
  Shape shape;
  int64_t batch = 0;
  float* x = nullptr;
};

}  // namespace

int main(int argc, char** argv) {
  int64_t d = 2048;
  int layers = 8, steps = 5, warmup = 3, iters = 10;
  double torch_ns_ms = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--d") d = std::strtol(v, nullptr, 10);
    else if (k == "--layers") layers = static_cast<int>(std::strtol(v, nullptr, 10));
    else if (k == "--steps") steps = static_cast<int>(std::strtol(v, nullptr, 10));
    else if (k == "--warmup") warmup = static_cast<int>(std::strtol(v, nullptr, 10));
    else if (k == "--iters") iters = static_cast<int>(std::strtol(v, nullptr, 10));
    else if (k == "--torch-ns-ms") torch_ns_ms = std::strtod(v, nullptr);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  std::string why;
  if (!cu::DevicePresent(&why)) {
    std::printf("{\"skipped\": \"needs a CUDA GPU (%s)\"}\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const std::vector<Shape> shapes = GptShapes(d, layers);
  std::map<std::pair<int64_t, int64_t>, int64_t> counts;
  int64_t params = 0;
  for (const Shape& s : shapes) {
    ++counts[{s.m, s.n}];
    params += s.m * s.n;
  }

  std::unique_ptr<cu::NewtonSchulzRunner> ns;
  CHECK_OK(cu::NewtonSchulzRunner::Create(&ns));
  std::vector<Group> groups;
  int64_t ws_bytes = 0;
  for (const auto& [shape, count] : counts) {
    Group g;
    g.shape = {shape.first, shape.second};
    g.batch = count;
    const size_t n = static_cast<size_t>(count * shape.first * shape.second);
    std::vector<float> h(n);
    FillRandom(&h, 1.0f, 5 + groups.size());
    CHECK_CUDA(cudaMalloc(&g.x, n * sizeof(float)));
    CHECK_CUDA(cudaMemcpy(g.x, h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    for (NsForm form : {NsForm::kAuto, NsForm::kStandard}) {
      ws_bytes = std::max(ws_bytes, cu::NewtonSchulzRunner::WorkspaceBytes(count, shape.first, shape.second, form, true));
      CHECK_OK(ns->Prepare(count, shape.first, shape.second, form, true));
    }
    groups.push_back(g);
  }
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, static_cast<size_t>(ws_bytes)));

  // NS overwrites its input with O; the next repetition runs on that O, which costs the
  // same (the GEMMs do not depend on the values).
  const auto run = [&](const Group& g, NsForm form) {
    CHECK_OK(ns->Run(NsCoeffSet::kQuintic, steps, g.batch, g.shape.m, g.shape.n, g.x,
                     g.shape.m * g.shape.n, form, true, ws, ws_bytes, nullptr));
  };
  double flops = 0, flops_standard = 0;
  int64_t launches = 0;
  std::string per_shape;
  for (const Group& g : groups) {
    const NsForm form = cu::NewtonSchulzRunner::Resolve(NsForm::kAuto, g.shape.m, g.shape.n);
    const double f = cu::NewtonSchulzRunner::Flops(steps, g.batch, g.shape.m, g.shape.n, form);
    flops += f;
    flops_standard += cu::NewtonSchulzRunner::Flops(steps, g.batch, g.shape.m, g.shape.n, NsForm::kStandard);
    launches += cu::NewtonSchulzRunner::Launches(steps, g.batch, g.shape.m, g.shape.n, form, true);
    const Timing t = Time(warmup, iters, [&] { run(g, NsForm::kAuto); });
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "%s{\"m\": %lld, \"n\": %lld, \"batch\": %lld, \"form\": \"%s\", \"ms\": %.4f, "
                  "\"min_ms\": %.4f, \"tflops\": %.1f}",
                  per_shape.empty() ? "" : ",\n   ", static_cast<long long>(g.shape.m),
                  static_cast<long long>(g.shape.n), static_cast<long long>(g.batch),
                  form == NsForm::kGram ? "gram" : "standard", t.mean_ms, t.min_ms,
                  f / (t.mean_ms * 1e-3) / 1e12);
    per_shape += buf;
  }
  const Timing all = Time(warmup, iters, [&] {
    for (const Group& g : groups) run(g, NsForm::kAuto);
  });
  const Timing standard = Time(warmup, iters, [&] {
    for (const Group& g : groups) run(g, NsForm::kStandard);
  });
  CHECK_CUDA(cudaDeviceSynchronize());
  char ratio[64] = "null";
  if (torch_ns_ms > 0) std::snprintf(ratio, sizeof ratio, "%.3f", all.mean_ms / torch_ns_ms);
  std::printf(
      "{\"device\": \"%s\", \"d\": %lld, \"layers\": %d, \"matrices\": %zu, \"params\": %lld, "
      "\"steps\": %d,\n"
      " \"ns_ms\": %.4f, \"ns_min_ms\": %.4f, \"ns_tflops\": %.1f, \"ns_launches\": %lld, "
      "\"ns_workspace_bytes\": %lld,\n"
      " \"ns_standard_ms\": %.4f, \"ns_standard_tflops\": %.1f,\n"
      " \"ns_vs_torch\": %s, \"ns_vs_torch_goal\": 0.6,\n"
      " \"ns_shapes\": [%s]}\n",
      prop.name, static_cast<long long>(d), layers, shapes.size(), static_cast<long long>(params), steps,
      all.mean_ms, all.min_ms, flops / (all.mean_ms * 1e-3) / 1e12, static_cast<long long>(launches),
      static_cast<long long>(ws_bytes), standard.mean_ms,
      flops_standard / (standard.mean_ms * 1e-3) / 1e12, ratio, per_shape.c_str());
  for (Group& g : groups) cudaFree(g.x);
  cudaFree(ws);
  return 0;
}
