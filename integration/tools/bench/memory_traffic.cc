#include "memory_traffic.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>

namespace mdopt_bench {
namespace {

// What the model needs to know of a group spec's preset (DESIGN.md's preset table).
struct PassShape {
  bool muon = false;
  bool projected = false;  // a sphere or gains: the finishing pass runs
  bool gains = false;      // pass 1 also reads W for the gain gradients (Muon)
};

PassShape ShapeOf(const std::string& spec) {
  const std::string key = "preset=";
  const size_t at = spec.find(key);
  std::string name = at == std::string::npos ? "" : spec.substr(at + key.size());
  name = name.substr(0, name.find(' '));
  PassShape s;
  s.muon = name == "md-muon" || name == "muon" || name == "muonh" || name == "router";
  s.projected = name == "md-muon" || name == "muonh" || name == "router" || name == "md-adamw" ||
                name == "adamh" || name == "embedding";
  s.gains = name == "md-muon" || name == "md-adamw" || name == "router";
  return s;
}

// Bytes per element of one tensor's step.
int64_t ElementBytes(const PassShape& s, int param_bytes, int grad_bytes) {
  const int64_t w = 4;                                     // f32 master (or the f32 model)
  const int64_t model = param_bytes == 4 ? 0 : 2 * param_bytes;  // bf16 copy + write-allocate
  int64_t b = grad_bytes;                                  // finite check
  if (s.muon) {
    b += grad_bytes + 4 + (s.gains ? w : 0) + 4 + 2 * 4;   // pass 1: G, buf, (W); buf, X
    b += w + 4 + w + (s.projected ? 0 : model);            // pass 2: W, O; W
  } else {
    b += w + grad_bytes + 8 + 8 + w + (s.projected ? 0 : model);  // W, G, m, v; m, v, W
  }
  if (s.projected) b += 2 * w + model;                     // finish: W; W and the model copy
  return b;
}

// The in-place kernel has Adam's access pattern: w, m, v read and written, g read.
void InplaceBlock(float* __restrict w, float* __restrict m, float* __restrict v,
                  const float* __restrict g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    m[i] = 0.9f * m[i] + 0.1f * g[i];
    v[i] = 0.95f * v[i] + 0.05f * g[i] * g[i];
    w[i] = 0.999f * w[i] - 1e-3f * m[i];
  }
}

void TriadBlock(float* __restrict a, const float* __restrict b, const float* __restrict c,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] + 3.0f * c[i];
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 == 1 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

// Runs f(begin, count) on `threads` threads over contiguous blocks of [0, n); seconds.
template <typename F>
double OnThreads(int64_t n, int threads, const F& f) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t) {
    const int64_t b = n * t / threads, e = n * (t + 1) / threads;
    team.emplace_back([&f, b, e] { f(b, e - b); });
  }
  for (std::thread& th : team) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int64_t ModelStepBytes(const PresetGrouping& preset, const std::vector<TensorShape>& shapes,
                       int param_bytes, int grad_bytes) {
  int64_t total = 0;
  for (const TensorShape& t : shapes) {
    const PassShape s = ShapeOf(RoleSpec(preset, RoleOf(t.kind)));
    total += t.numel() * ElementBytes(s, param_bytes, grad_bytes);
  }
  return total;
}

StreamBandwidth MeasureStream(int64_t elements, int threads, int reps) {
  StreamBandwidth out;
  out.elements = elements;
  out.threads = std::max(threads, 1);
  if (elements <= 0) return out;
  const size_t n = static_cast<size_t>(elements);
  // Uninitialised storage, first touched by the thread that streams each block.
  std::unique_ptr<float[]> a(new float[n]), b(new float[n]), c(new float[n]), d(new float[n]);
  OnThreads(elements, out.threads, [&](int64_t s, int64_t k) {
    std::fill(a.get() + s, a.get() + s + k, 1.0f);
    std::fill(b.get() + s, b.get() + s + k, 0.5f);
    std::fill(c.get() + s, c.get() + s + k, 0.25f);
    std::fill(d.get() + s, d.get() + s + k, 0.125f);
  });
  std::vector<double> inplace, triad;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    inplace.push_back(OnThreads(elements, out.threads, [&](int64_t s, int64_t k) {
      InplaceBlock(a.get() + s, b.get() + s, c.get() + s, d.get() + s, k);
    }));
    triad.push_back(OnThreads(elements, out.threads, [&](int64_t s, int64_t k) {
      TriadBlock(a.get() + s, b.get() + s, c.get() + s, k);
    }));
  }
  const double bytes = static_cast<double>(elements);
  out.inplace_gbps = 28.0 * bytes / Median(inplace) / 1e9;
  out.triad_gbps = 24.0 * bytes / Median(triad) / 1e9;
  return out;
}

}  // namespace mdopt_bench
