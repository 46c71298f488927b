// mdopt-ns-bench: one Newton-Schulz call (kernels/cpu/newton_schulz.h) timed alone,
// standard form against Gram form, per shape. GFLOP/s count each form's own flops by its
// formula (s = min(m, n), l = max(m, n), K steps): standard K (3 s^2 l + s^3), Gram
// 3 s^2 l + (4K - 3) s^3, so the two rates are not the same work; the times are comparable.
// A kernel-level benchmark (the step through the C ABI is mdopt-bench's). With --batch B it
// times instead, per form, B calls one matrix at a time against one NewtonSchulzBatch call
// on all B (the same bits, checked). With --bf16 it times the bf16 Newton-Schulz
// (ns_dtype=bf16, newton_schulz_bf16.h) in both forms instead; its flop counts are those of
// full GEMMs (oneDNN has no symmetric product): standard K (4 s^2 l + 2 s^3), Gram
// 4 s^2 l + (4K - 3) 2 s^3.
//
//   mdopt-ns-bench [--threads 2] [--reps 5] [--steps 5] [--batch B | --bf16] [MxN ...]
//   (default shapes: 1024x4096 4096x1024 1024x1024 256x1024)
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/newton_schulz.h"
#include "kernels/cpu/newton_schulz_bf16.h"

namespace {

using mdopt::kernels::NsCoeffSet;
using mdopt::kernels::NsForm;
namespace fast = mdopt::kernels::fast;

struct Shape {
  int64_t m, n;
};

double Flops(NsForm form, int steps, const Shape& sh, bool bf16) {
  const double s = static_cast<double>(std::min(sh.m, sh.n));
  const double l = static_cast<double>(std::max(sh.m, sh.n));
  if (bf16) {
    if (form == NsForm::kGram) return 4 * s * s * l + (4.0 * steps - 3) * 2 * s * s * s;
    return steps * (4 * s * s * l + 2 * s * s * s);
  }
  if (form == NsForm::kGram) return 3 * s * s * l + (4.0 * steps - 3) * s * s * s;
  return steps * (3 * s * s * l + s * s * s);
}

// Median seconds of `reps` calls (after one untimed call that also sizes the workspace);
// *out gets O of the last call.
double TimeNs(NsForm form, int steps, int reps, const Shape& sh, const std::vector<float>& x0,
              bool bf16, std::vector<float>* out) {
  fast::NsWorkspace ws;
  fast::Bf16NewtonSchulz ws16;
  if (bf16) {
    ws16.Reserve(sh.m, sh.n, form);
  } else {
    ws.Reserve(sh.m, sh.n, form);
  }
  std::vector<float> x(x0.size());
  std::vector<double> secs;
  for (int r = 0; r <= reps; ++r) {
    std::copy(x0.begin(), x0.end(), x.begin());
    const auto t0 = std::chrono::steady_clock::now();
    const float* o =
        bf16 ? ws16.Run(NsCoeffSet::kQuintic, steps, sh.m, sh.n, x.data(), form)
             : fast::NewtonSchulz(NsCoeffSet::kQuintic, steps, sh.m, sh.n, x.data(), &ws, form);
    const auto t1 = std::chrono::steady_clock::now();
    if (r > 0) secs.push_back(std::chrono::duration<double>(t1 - t0).count());
    if (r == reps) out->assign(o, o + x.size());
  }
  std::sort(secs.begin(), secs.end());
  return secs[secs.size() / 2];
}

// Median seconds of `reps` runs over `batch` matrices: one call each, or one batched call.
double TimeBatch(NsForm form, int steps, int reps, const Shape& sh, int64_t batch, bool batched,
                 const std::vector<float>& x0, std::vector<float>* out) {
  const int64_t numel = sh.m * sh.n;
  fast::NsWorkspace ws;
  ws.Reserve(sh.m, sh.n, form, batched ? batch : 1);
  std::vector<float> x(x0.size());
  out->resize(x0.size());
  std::vector<double> secs;
  for (int r = 0; r <= reps; ++r) {
    std::copy(x0.begin(), x0.end(), x.begin());
    const auto t0 = std::chrono::steady_clock::now();
    if (batched) {
      const float* o = fast::NewtonSchulzBatch(NsCoeffSet::kQuintic, steps, batch, sh.m, sh.n,
                                               x.data(), &ws, form);
      if (r == reps) std::copy(o, o + batch * numel, out->begin());
    } else {
      for (int64_t e = 0; e < batch; ++e) {
        const float* o = fast::NewtonSchulz(NsCoeffSet::kQuintic, steps, sh.m, sh.n,
                                            x.data() + e * numel, &ws, form);
        if (r == reps) std::copy(o, o + numel, out->begin() + e * numel);
      }
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (r > 0) secs.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  std::sort(secs.begin(), secs.end());
  return secs[secs.size() / 2];
}

bool ParseShape(const char* text, Shape* sh) {
  long long m = 0, n = 0;
  char tail = 0;
  if (std::sscanf(text, "%lldx%lld%c", &m, &n, &tail) != 2 || m < 1 || n < 1) return false;
  *sh = {m, n};
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 5, steps = 5, batch = 0;
  bool bf16 = false;
  std::vector<Shape> shapes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    Shape sh;
    if ((a == "--threads" || a == "--reps" || a == "--steps" || a == "--batch") && i + 1 < argc) {
      const int v = std::atoi(argv[++i]);
      if (v < 1) {
        std::fprintf(stderr, "%s: needs a positive integer\n", a.c_str());
        return 2;
      }
      (a == "--threads" ? threads : a == "--reps" ? reps : a == "--steps" ? steps : batch) = v;
    } else if (a == "--bf16") {
      bf16 = true;
    } else if (ParseShape(argv[i], &sh)) {
      shapes.push_back(sh);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--threads T] [--reps R] [--steps K] [--batch B | --bf16] "
                   "[MxN ...]\n",
                   argv[0]);
      return 2;
    }
  }
  if (shapes.empty()) shapes = {{1024, 4096}, {4096, 1024}, {1024, 1024}, {256, 1024}};
  omp_set_num_threads(threads);
  if (bf16 && batch > 0) {
    std::fprintf(stderr, "--bf16 and --batch: the bf16 Newton-Schulz has no batched form\n");
    return 2;
  }
  if (bf16 && !fast::Bf16NewtonSchulz::Available()) {
    std::fprintf(stderr, "--bf16: no bf16 matmul here (needs oneDNN and AVX512_BF16 or AMX)\n");
    return 2;
  }
  if (batch > 0) {
    std::printf("threads=%d steps=%d quintic, %d matrices, median of %d runs\n", threads, steps,
                batch, reps);
    std::printf("%-11s %-9s %13s %11s %9s %8s\n", "shape", "form", "one by one ms", "batched ms",
                "speedup", "bitwise");
    for (const Shape& sh : shapes) {
      std::mt19937_64 rng(static_cast<uint64_t>(sh.m * 7919 + sh.n));
      std::normal_distribution<float> dist(0.0f, 1.0f);
      std::vector<float> x0(static_cast<size_t>(sh.m * sh.n * batch));
      for (float& v : x0) v = dist(rng);
      for (NsForm form : {NsForm::kStandard, NsForm::kGram}) {
        std::vector<float> o1, ob;
        const double t1 = TimeBatch(form, steps, reps, sh, batch, false, x0, &o1);
        const double tb = TimeBatch(form, steps, reps, sh, batch, true, x0, &ob);
        char name[32];
        std::snprintf(name, sizeof(name), "%lldx%lld", static_cast<long long>(sh.m),
                      static_cast<long long>(sh.n));
        std::printf("%-11s %-9s %13.1f %11.1f %8.2fx %8s\n", name,
                    form == NsForm::kGram ? "gram" : "standard", t1 * 1e3, tb * 1e3, t1 / tb,
                    o1 == ob ? "yes" : "NO");
      }
    }
    return 0;
  }
  std::printf("threads=%d steps=%d quintic, %s products, median of %d calls\n", threads, steps,
              bf16 ? "bf16 (oneDNN)" : "float32", reps);
  std::printf("%-11s %-5s %12s %10s %10s %10s %9s %11s\n", "shape", "auto", "standard ms",
              "GFLOP/s", "gram ms", "GFLOP/s", "speedup", "rel diff");
  for (const Shape& sh : shapes) {
    std::mt19937_64 rng(static_cast<uint64_t>(sh.m * 7919 + sh.n));
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> x0(static_cast<size_t>(sh.m * sh.n));
    for (float& v : x0) v = dist(rng);
    std::vector<float> o_std, o_gram;
    const double t_std = TimeNs(NsForm::kStandard, steps, reps, sh, x0, bf16, &o_std);
    const double t_gram = TimeNs(NsForm::kGram, steps, reps, sh, x0, bf16, &o_gram);
    double e = 0.0, r = 0.0;
    for (size_t i = 0; i < o_std.size(); ++i) {
      e += (o_gram[i] - o_std[i]) * static_cast<double>(o_gram[i] - o_std[i]);
      r += o_std[i] * static_cast<double>(o_std[i]);
    }
    const NsForm chosen = bf16 ? fast::Bf16NewtonSchulz::ResolveForm(NsForm::kAuto, sh.m, sh.n)
                               : fast::ResolveNsForm(NsForm::kAuto, sh.m, sh.n);
    const bool gram = chosen == NsForm::kGram;
    char name[32];
    std::snprintf(name, sizeof(name), "%lldx%lld", static_cast<long long>(sh.m),
                  static_cast<long long>(sh.n));
    const double gf_std = Flops(NsForm::kStandard, steps, sh, bf16) / t_std * 1e-9;
    const double gf_gram = Flops(NsForm::kGram, steps, sh, bf16) / t_gram * 1e-9;
    std::printf("%-11s %-5s %12.1f %10.1f %10.1f %10.1f %8.2fx %11.2e\n", name,
                gram ? "gram" : "std", t_std * 1e3, gf_std, t_gram * 1e3, gf_gram, t_std / t_gram,
                std::sqrt(e / r));
  }
  return 0;
}
