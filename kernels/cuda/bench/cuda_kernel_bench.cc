// mdopt-cuda-bench: the CUDA kernels' step time on a GPT-shaped set (DESIGN.md section 8:
// d=2048, 8 layers, ffn 4x; the hidden matrices q, k, v, o, fc1, fc2 of every layer), for
// md-adamw (one fused pass and the rescale), md-muon (passes plus batched bf16
// Newton-Schulz) and Newton-Schulz alone. float32 parameters and gradients, as torch's
// baselines (torch_baselines.py) use. Prints one JSON object.
//
// A kernel-level benchmark: the optimizer itself does not run on CUDA yet, so this drives
// kernels/cuda directly (its tests do the same).
//
//   mdopt-cuda-bench [--d 2048] [--layers 8] [--warmup 3] [--iters 10]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/gain_param.h"
#include "kernels/cuda/fused_passes.h"
#include "kernels/cuda/newton_schulz.h"

namespace cu = mdopt::kernels::cuda;
using mdopt::kernels::Base;
using mdopt::kernels::Gains;
using mdopt::kernels::Sphere;
using mdopt::kernels::UpdateRule;

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

std::vector<Shape> GptShapes(int64_t d, int layers) {
  std::vector<Shape> s;
  for (int l = 0; l < layers; ++l) {
    for (int k = 0; k < 4; ++k) s.push_back({d, d});  // q, k, v, o
    s.push_back({4 * d, d});                         // fc1
    s.push_back({d, 4 * d});                         // fc2
  }
  return s;
}

std::vector<void*> g_allocs;

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

float* DeviceFill(size_t n, float scale, uint64_t seed, bool random) {
  std::vector<float> h(n, scale);
  if (random) FillRandom(&h, scale, seed);
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, n * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(p, h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  g_allocs.push_back(p);
  return static_cast<float*>(p);
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

// A bucket of every matrix under `rule`, with random weights and gradients.
std::unique_ptr<cu::FusedBucket> MakeBucket(const UpdateRule& rule, const std::vector<Shape>& shapes,
                                            int64_t* params) {
  std::vector<cu::MatrixBuffers> bufs;
  const float one = static_cast<float>(mdopt::kernels::GainRawForOne(rule.gain_param));
  *params = 0;
  for (size_t k = 0; k < shapes.size(); ++k) {
    const Shape& s = shapes[k];
    const size_t mn = static_cast<size_t>(s.m * s.n);
    *params += static_cast<int64_t>(mn);
    cu::MatrixBuffers b;
    b.m = s.m;
    b.n = s.n;
    b.w = DeviceFill(mn, 1.0f / std::sqrt(static_cast<float>(s.n)), 10 + k, true);
    b.grad = DeviceFill(mn, 1e-3f, 1000 + k, true);
    b.state0 = DeviceFill(mn, 0.0f, 0, false);
    if (rule.base == Base::kAdamW) b.state1 = DeviceFill(mn, 0.0f, 0, false);
    b.row_raw = DeviceFill(s.m, one, 0, false);
    b.row_exp_avg = DeviceFill(s.m, 0.0f, 0, false);
    b.row_exp_avg_sq = DeviceFill(s.m, 0.0f, 0, false);
    b.col_raw = DeviceFill(s.n, one, 0, false);
    b.col_exp_avg = DeviceFill(s.n, 0.0f, 0, false);
    b.col_exp_avg_sq = DeviceFill(s.n, 0.0f, 0, false);
    b.radius = DeviceFill(1, std::sqrt(static_cast<float>(std::max(s.m, s.n))), 0, false);
    bufs.push_back(b);
  }
  std::unique_ptr<cu::FusedBucket> bucket;
  CHECK_OK(cu::FusedBucket::Create(rule, bufs, &bucket));
  return bucket;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t d = 2048;
  int layers = 8, warmup = 3, iters = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const long v = std::strtol(argv[i + 1], nullptr, 10);
    if (k == "--d") d = v;
    else if (k == "--layers") layers = static_cast<int>(v);
    else if (k == "--warmup") warmup = static_cast<int>(v);
    else if (k == "--iters") iters = static_cast<int>(v);
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

  UpdateRule adamw;  // md-adamw
  adamw.base = Base::kAdamW;
  adamw.lr = 1e-3;
  UpdateRule muon;  // md-muon (UpdateRule's defaults)
  int64_t params = 0;
  cu::StepNumbers s;
  double adamw_ms = 0, adamw_min = 0, muon_ms = 0, muon_min = 0;
  int adamw_launches = 0, muon_launches = 0;
  int64_t adamw_ws = 0, muon_ws = 0;
  {
    std::unique_ptr<cu::FusedBucket> b = MakeBucket(adamw, shapes, &params);
    s.lr = adamw.lr;
    s.gain_lr = adamw.gain_lr;
    int64_t t = 0;
    const Timing tm = Time(warmup, iters, [&] {
      s.t = ++t;
      CHECK_OK(b->Step(s, nullptr));
    });
    adamw_ms = tm.mean_ms;
    adamw_min = tm.min_ms;
    adamw_launches = b->launches_per_step();
    adamw_ws = b->workspace_bytes();
  }
  for (void* p : g_allocs) cudaFree(p);
  g_allocs.clear();
  {
    std::unique_ptr<cu::FusedBucket> b = MakeBucket(muon, shapes, &params);
    s.lr = muon.lr;
    s.gain_lr = muon.gain_lr;
    int64_t t = 0;
    const Timing tm = Time(warmup, iters, [&] {
      s.t = ++t;
      CHECK_OK(b->Step(s, nullptr));
    });
    muon_ms = tm.mean_ms;
    muon_min = tm.min_ms;
    muon_launches = b->launches_per_step();
    muon_ws = b->workspace_bytes();
  }
  for (void* p : g_allocs) cudaFree(p);
  g_allocs.clear();
  // Newton-Schulz alone: one batch per shape, 5 quintic iterations.
  std::map<std::pair<int64_t, int64_t>, int64_t> groups;
  for (const Shape& sh : shapes) ++groups[{sh.m, sh.n}];
  std::vector<std::unique_ptr<cu::BatchedNewtonSchulz>> ns;
  double flops = 0;
  for (const auto& [shape, count] : groups) {
    std::unique_ptr<cu::BatchedNewtonSchulz> x;
    CHECK_OK(cu::BatchedNewtonSchulz::Create(count, shape.first, shape.second,
                                             mdopt::kernels::NsCoeffSet::kQuintic, 5, &x));
    const size_t n = static_cast<size_t>(count * shape.first * shape.second);
    std::vector<float> h(n);
    FillRandom(&h, 1.0f, 5);
    CHECK_CUDA(cudaMemcpy(x->input(), h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    flops += x->flops();
    ns.push_back(std::move(x));
  }
  const Timing nt = Time(warmup, iters, [&] {
    for (auto& x : ns) CHECK_OK(x->Run(nullptr));
  });
  CHECK_CUDA(cudaDeviceSynchronize());
  std::printf(
      "{\"device\": \"%s\", \"d\": %lld, \"layers\": %d, \"matrices\": %zu, \"params\": %lld,\n"
      " \"md_adamw_ms\": %.4f, \"md_adamw_min_ms\": %.4f, \"md_adamw_launches\": %d, "
      "\"md_adamw_workspace_bytes\": %lld,\n"
      " \"md_muon_ms\": %.4f, \"md_muon_min_ms\": %.4f, \"md_muon_launches\": %d, "
      "\"md_muon_workspace_bytes\": %lld,\n"
      " \"ns_ms\": %.4f, \"ns_min_ms\": %.4f, \"ns_tflops\": %.1f}\n",
      prop.name, static_cast<long long>(d), layers, shapes.size(), static_cast<long long>(params),
      adamw_ms, adamw_min, adamw_launches, static_cast<long long>(adamw_ws), muon_ms, muon_min,
      muon_launches, static_cast<long long>(muon_ws), nt.mean_ms, nt.min_ms,
      flops / (nt.mean_ms * 1e-3) / 1e12);
  return 0;
}
