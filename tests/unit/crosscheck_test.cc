// Cross-checks by construction: groups whose MD machinery is switched off must be the plain
// optimizers they reduce to, and knobs that are equivalent by the math must give the same
// numbers. The comparisons are against a float64 implementation written here in plain loops
// from DESIGN.md section 1 (and the torch.optim AdamW / Muon conventions it cites) that
// shares no code with kernels/: plain Muon with Nesterov momentum, quintic Newton-Schulz and
// decoupled weight decay; AdamW with bias correction and eps outside the square root. The
// kernels' own Newton-Schulz functions are called directly only where they are the subject.
//
// Every test's name starts with `crosscheck` (suite or instantiation prefix) so that
// `ctest -R crosscheck` selects them. The library runs through the C ABI. Tolerances are
// relative max errors over a tensor, max |a - b| / max |b|:
//   kernels=reference: kRefTol = 1e-12. Both sides are float64 from the same float32 inputs;
//     only summation order differs (measured at most 8.5e-16 after 20 steps).
//   kernels=fast: float32 state and a float32 BLAS Newton-Schulz; W is rounded to float32
//     every step, so after 20 steps it carries a few ulps (6e-8 each) per step of drift.
//     kFastTol = 5e-6 (measured at most 7e-7, see the [ measured ] lines; 7x margin).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "kernels/cpu/newton_schulz.h"
#include "kernels/reference/reference.h"
#include "numeric_util.h"
#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::RelMaxError;
using testing::TensorSpec;

constexpr double kRefTol = 1e-12;
constexpr double kFastTol = 5e-6;
constexpr int kSteps = 20;

const char* kEngines[] = {"kernels=reference", "kernels=fast"};
double TolFor(const std::string& engine) { return engine == "kernels=fast" ? kFastTol : kRefTol; }

// A gtest name from a spec and an engine index.
std::string CaseName(std::string spec, int engine) {
  for (char& c : spec)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return spec + (engine == 0 ? "_reference" : "_fast");
}

// ---------------------------------------------------------------------------------------
// The independent float64 implementation.

using Coeffs = std::array<double, 3>;

// DESIGN.md section 1: the per-step quintic tuples (modded-nanogpt, Dion, the authors'
// Newton-Schulz); a set used for more steps than it has tuples is cycled whole (iteration k
// uses tuple k mod its size), as ns_coeffs=quintic does.
const std::vector<Coeffs> kQuinticSet = {{4.0848, -6.8946, 2.9270},
                                          {3.9505, -6.3029, 2.6377},
                                          {3.7418, -5.5913, 2.3037},
                                          {2.8769, -3.1427, 1.2046},
                                          {2.8366, -3.0525, 1.2012}};
// torch.optim.Muon's single tuple, every step.
const std::vector<Coeffs> kJordanSet = {{3.4445, -4.7750, 2.0315}};

// A dense row-major matrix.
struct Mat {
  int64_t r = 0, c = 0;
  std::vector<double> a;
  Mat() = default;
  Mat(int64_t rows, int64_t cols) : r(rows), c(cols), a(static_cast<size_t>(rows * cols), 0.0) {}
  double& at(int64_t i, int64_t j) { return a[static_cast<size_t>(i * c + j)]; }
  double at(int64_t i, int64_t j) const { return a[static_cast<size_t>(i * c + j)]; }
};

Mat Transposed(const Mat& x) {
  Mat t(x.c, x.r);
  for (int64_t i = 0; i < x.r; ++i)
    for (int64_t j = 0; j < x.c; ++j) t.at(j, i) = x.at(i, j);
  return t;
}

Mat Product(const Mat& x, const Mat& y) {
  Mat z(x.r, y.c);
  for (int64_t i = 0; i < x.r; ++i)
    for (int64_t j = 0; j < y.c; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < x.c; ++k) s += x.at(i, k) * y.at(k, j);
      z.at(i, j) = s;
    }
  return z;
}

// O = NS(X): X / (||X||_F + 1e-7), then X <- a X + (b A + c A^2) X with A = X X^T on the
// wide orientation (a tall X is transposed first and O transposed back).
Mat NewtonSchulz(const Mat& in, const std::vector<Coeffs>& set, int steps) {
  const bool tall = in.r > in.c;
  Mat x = tall ? Transposed(in) : in;
  double sq = 0.0;
  for (double v : x.a) sq += v * v;
  const double norm = std::sqrt(sq) + 1e-7;
  for (double& v : x.a) v /= norm;
  for (int k = 0; k < steps; ++k) {
    const Coeffs& t = set[static_cast<size_t>(k) % set.size()];
    const Mat a = Product(x, Transposed(x));
    const Mat a2 = Product(a, a);
    Mat b(a.r, a.c);
    for (size_t e = 0; e < b.a.size(); ++e) b.a[e] = t[1] * a.a[e] + t[2] * a2.a[e];
    const Mat bx = Product(b, x);
    for (size_t e = 0; e < x.a.size(); ++e) x.a[e] = t[0] * x.a[e] + bx.a[e];
  }
  return tall ? Transposed(x) : x;
}

// Plain Muon of one matrix, with decoupled weight decay (torch.optim.Muon's order).
struct PlainMuon {
  double lr = 0.0, weight_decay = 0.0, momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  std::string scale = "ratio";  // ratio | max1

  double Scale(int64_t m, int64_t n) const {
    const double dm = static_cast<double>(m), dn = static_cast<double>(n);
    if (scale == "max1") return std::max(1.0, std::sqrt(dm / dn));
    return std::sqrt(std::max(dm / dn, dn / dm));
  }
  void Step(const Mat& g, Mat* w, Mat* buf) const {
    Mat x(g.r, g.c);
    for (size_t e = 0; e < g.a.size(); ++e) {
      buf->a[e] = momentum * buf->a[e] + g.a[e];
      x.a[e] = nesterov ? g.a[e] + momentum * buf->a[e] : buf->a[e];
    }
    const Mat o = NewtonSchulz(x, kQuinticSet, ns_steps);
    const double s = Scale(g.r, g.c);
    for (size_t e = 0; e < w->a.size(); ++e)
      w->a[e] = w->a[e] * (1.0 - lr * weight_decay) - lr * s * o.a[e];
  }
};

// AdamW on a flat tensor (torch.optim.AdamW): decoupled decay W *= 1 - lr * wd, then
// W -= lr * m_hat / (sqrt(v_hat) + eps) with bias-corrected moments.
struct PlainAdamW {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  void Step(const std::vector<double>& g, int64_t t, std::vector<double>* w,
            std::vector<double>* m, std::vector<double>* v) const {
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
    for (size_t e = 0; e < w->size(); ++e) {
      (*w)[e] *= 1.0 - lr * weight_decay;
      (*m)[e] = beta1 * (*m)[e] + (1.0 - beta1) * g[e];
      (*v)[e] = beta2 * (*v)[e] + (1.0 - beta2) * g[e] * g[e];
      const double mhat = (*m)[e] / bc1, vhat = (*v)[e] / bc2;
      (*w)[e] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Helpers around the harness.

struct Dims {
  int64_t experts, m, n;
};

Dims DimsOf(const TensorSpec& t) {
  if (t.shape.size() == 3) return {t.shape[0], t.shape[1], t.shape[2]};
  if (t.shape.size() == 2) return {1, t.shape[0], t.shape[1]};
  return {1, 1, t.shape[0]};
}

std::vector<double> Grad(AbiHarness& h, size_t i) {
  return std::vector<double>(h.buffers(i).grad_f32.begin(), h.buffers(i).grad_f32.end());
}

// Expert e of a flat tensor as a matrix.
Mat Slice(const std::vector<double>& flat, const Dims& d, int64_t e) {
  Mat x(d.m, d.n);
  std::copy(flat.begin() + e * d.m * d.n, flat.begin() + (e + 1) * d.m * d.n, x.a.begin());
  return x;
}

double FrobeniusNorm(const double* x, int64_t count) {
  double s = 0.0;
  for (int64_t k = 0; k < count; ++k) s += x[k] * x[k];
  return std::sqrt(s);
}

// ---------------------------------------------------------------------------------------
// (a) Muon with the MD machinery off is plain Muon.

struct MuonCase {
  std::string spec;
  PlainMuon muon;
};

std::vector<MuonCase> MuonCases() {
  PlainMuon md;  // md-muon: lr 8e-3, no decay, ratio scale
  md.lr = 8e-3;
  PlainMuon plain;  // preset=muon: lr 2e-2, decay 0.1, max1 scale
  plain.lr = 2e-2;
  plain.weight_decay = 0.1;
  plain.scale = "max1";
  PlainMuon heavy = md;  // momentum without the Nesterov look-ahead
  heavy.nesterov = false;
  heavy.momentum = 0.8;
  PlainMuon ten = plain;  // more steps than quintic tuples: the set is cycled
  ten.ns_steps = 10;
  return {{"preset=md-muon sphere=none gains=none", md},
          {"preset=muon", plain},
          {"preset=md-muon sphere=none gains=none nesterov=0 momentum=0.8", heavy},
          {"preset=muon ns_steps=10", ten}};
}

class PlainMuonTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(PlainMuonTest, MatchesIndependentFloat64) {
  const MuonCase c = MuonCases()[std::get<0>(GetParam())];
  const std::string engine = kEngines[std::get<1>(GetParam())];
  SCOPED_TRACE(c.spec + " " + engine);
  const uint64_t seed = 300 + std::get<0>(GetParam());
  // Both orientations, a single row, an expert stack and a matrix big enough for the fast
  // engine's threaded passes and blocked BLAS.
  const std::vector<TensorSpec> tensors = {
      {"wide", {7, 19}}, {"tall", {23, 6}}, {"row1", {1, 11}}, {"stack", {3, 5, 8}}, {"big", {48, 160}}};
  AbiHarness h(engine, c.spec, tensors, seed);
  std::vector<std::vector<Mat>> w(tensors.size()), buf(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Dims d = DimsOf(tensors[i]);
    const std::vector<double> w0 = h.Model(i);
    for (int64_t e = 0; e < d.experts; ++e) {
      w[i].push_back(Slice(w0, d, e));
      buf[i].push_back(Mat(d.m, d.n));
    }
  }
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  double worst = 0.0;
  for (int step = 1; step <= kSteps; ++step) {
    h.SetGradients(seed, step);
    MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, nullptr));
    for (size_t i = 0; i < tensors.size(); ++i) {
      const Dims d = DimsOf(tensors[i]);
      const std::vector<double> g = Grad(h, i);
      std::vector<double> want;
      for (int64_t e = 0; e < d.experts; ++e) {
        c.muon.Step(Slice(g, d, e), &w[i][e], &buf[i][e]);
        want.insert(want.end(), w[i][e].a.begin(), w[i][e].a.end());
      }
      const double err = RelMaxError(h.State(i, "master"), want);
      worst = std::max(worst, err);
      ASSERT_LE(err, TolFor(engine)) << tensors[i].name << " after step " << step;
    }
  }
  std::cout << "[ measured ] " << engine << " '" << c.spec << "': " << worst << "\n";
}

INSTANTIATE_TEST_SUITE_P(crosscheck, PlainMuonTest,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(MuonCases().size())),
                                            ::testing::Range(0, 2)),
                         [](const auto& info) {
                           return CaseName(MuonCases()[std::get<0>(info.param)].spec,
                                           std::get<1>(info.param));
                         });

// ---------------------------------------------------------------------------------------
// (b) Adam with the MD machinery off is plain AdamW.

struct AdamCase {
  std::string spec;
  PlainAdamW adam;
};

std::vector<AdamCase> AdamCases() {
  PlainAdamW plain;  // preset=adamw: lr 1e-3, decay 0.1
  plain.weight_decay = 0.1;
  PlainAdamW md;  // md-adamw without sphere and gains: no decay
  PlainAdamW knobs;
  knobs.lr = 1e-2;
  knobs.beta1 = 0.8;
  knobs.beta2 = 0.99;
  knobs.eps = 1e-6;
  knobs.weight_decay = 0.3;
  return {{"preset=adamw", plain},
          {"preset=md-adamw sphere=none gains=none", md},
          {"preset=vector", md},
          {"preset=adamw lr=0.01 beta1=0.8 beta2=0.99 eps=1e-6 weight_decay=0.3", knobs}};
}

class PlainAdamWTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(PlainAdamWTest, MatchesIndependentFloat64) {
  const AdamCase c = AdamCases()[std::get<0>(GetParam())];
  const std::string engine = kEngines[std::get<1>(GetParam())];
  SCOPED_TRACE(c.spec + " " + engine);
  const uint64_t seed = 400 + std::get<0>(GetParam());
  const std::vector<TensorSpec> tensors = {{"wide", {7, 19}},     {"tall", {23, 6}},
                                           {"stack", {3, 5, 8}},  {"vec", {13}},
                                           {"big", {64, 700}}};
  AbiHarness h(engine, c.spec, tensors, seed);
  std::vector<std::vector<double>> w(tensors.size()), m(tensors.size()), v(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    w[i] = h.Model(i);
    m[i].assign(w[i].size(), 0.0);
    v[i].assign(w[i].size(), 0.0);
  }
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  double worst = 0.0;
  for (int step = 1; step <= kSteps; ++step) {
    h.SetGradients(seed, step);
    MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, nullptr));
    for (size_t i = 0; i < tensors.size(); ++i) {
      c.adam.Step(Grad(h, i), step, &w[i], &m[i], &v[i]);
      const double err = RelMaxError(h.State(i, "master"), w[i]);
      worst = std::max(worst, err);
      ASSERT_LE(err, TolFor(engine)) << tensors[i].name << " after step " << step;
    }
  }
  std::cout << "[ measured ] " << engine << " '" << c.spec << "': " << worst << "\n";
}

INSTANTIATE_TEST_SUITE_P(crosscheck, PlainAdamWTest,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(AdamCases().size())),
                                            ::testing::Range(0, 2)),
                         [](const auto& info) {
                           return CaseName(AdamCases()[std::get<0>(info.param)].spec,
                                           std::get<1>(info.param));
                         });

// ---------------------------------------------------------------------------------------
// (c) gain_lr = 0 freezes the gains where they start: at 1.

struct FrozenCase {
  std::string spec;
  bool exact_one;  // direct (r = 1) and exp (r = 0) represent 1 exactly in any precision
  bool frobenius;  // the direction is on a frobenius sphere of radius sqrt(max(m, n))
};

std::vector<FrozenCase> FrozenCases() {
  return {{"preset=md-muon gain_param=direct gain_lr=0", true, true},
          {"preset=md-adamw gain_param=direct gain_lr=0", true, true},
          {"preset=md-muon gain_param=exp gain_lr=0", true, true},
          {"preset=md-muon gain_lr=0", false, true},
          {"preset=md-adamw gain_lr=0", false, true},
          {"preset=md-muon gains=scalar gain_lr=0", false, true},
          {"preset=router gain_lr=0", false, false},
          {"preset=md-adamw sphere=col gains=row gain_lr=0", false, false}};
}

class FrozenGains : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(FrozenGains, StayAtOne) {
  const FrozenCase c = FrozenCases()[std::get<0>(GetParam())];
  const std::string engine = kEngines[std::get<1>(GetParam())];
  SCOPED_TRACE(c.spec + " " + engine);
  const uint64_t seed = 500 + std::get<0>(GetParam());
  const std::vector<TensorSpec> tensors = {
      {"wide", {7, 19}}, {"tall", {23, 6}}, {"col1", {9, 1}}, {"stack", {3, 5, 8}}};
  AbiHarness h(engine, c.spec, tensors, seed);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  // Softplus gains start at softplus(log(e - 1)); with float32 raw gains that is 1 to within
  // sigmoid(0.54) * 2^-25 ~ 2e-8. 1e-7 bounds it; float64 gives ~1e-16.
  const double one_tol = c.exact_one ? 0.0 : 1e-7;
  std::vector<std::vector<double>> initial(tensors.size());
  double worst_norm = 0.0;
  for (int step = 0; step <= kSteps; ++step) {
    if (step > 0) {
      h.SetGradients(seed, step);
      MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, nullptr));
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      std::vector<double> gains, v;
      for (const char* f : {"gain_row", "gain_col", "gain_scalar"})
        if (testing::TryState(h.opt(), static_cast<int64_t>(i), f, &v))
          gains.insert(gains.end(), v.begin(), v.end());
      ASSERT_FALSE(gains.empty());
      if (step == 0) initial[i] = gains;
      for (size_t k = 0; k < gains.size(); ++k) {
        // Not merely close: a zero gain step leaves the raw gain, hence the gain, unchanged.
        ASSERT_EQ(gains[k], initial[i][k]) << tensors[i].name << " gain " << k << " step " << step;
        ASSERT_LE(std::abs(gains[k] - 1.0), one_tol) << tensors[i].name << " gain " << k;
      }
      if (c.frobenius) {
        // Gains of 1 (exactly, or within 2e-8 for float32 softplus): W is D, so W itself sits
        // on the sphere ||W||_F = sqrt(max(m, n)).
        const Dims d = DimsOf(tensors[i]);
        const std::vector<double> master = h.State(i, "master");
        const std::vector<double> model = h.Model(i);
        const double r = std::sqrt(static_cast<double>(std::max(d.m, d.n)));
        for (int64_t e = 0; e < d.experts; ++e) {
          for (const std::vector<double>* x : {&master, &model}) {
            const double err =
                testing::RelErr(FrobeniusNorm(x->data() + e * d.m * d.n, d.m * d.n), r);
            worst_norm = std::max(worst_norm, err);
            // Float32 W: a few roundings per element, as in invariants_test (1e-6); the
            // reference's model copy is its float64 W rounded once (6e-8).
            ASSERT_LE(err, engine == "kernels=fast" ? 1e-6 : 1e-7) << tensors[i].name;
          }
        }
      }
    }
  }
  if (c.frobenius) {
    std::cout << "[ measured ] " << engine << " '" << c.spec << "': ||W||_F vs R " << worst_norm
              << "\n";
  }
}

INSTANTIATE_TEST_SUITE_P(crosscheck, FrozenGains,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(FrozenCases().size())),
                                            ::testing::Range(0, 2)),
                         [](const auto& info) {
                           return CaseName(FrozenCases()[std::get<0>(info.param)].spec,
                                           std::get<1>(info.param));
                         });

// ---------------------------------------------------------------------------------------
// (d) Polar Express orthogonalises better than Jordan's tuple at the same number of steps.

// A p x q matrix U diag(s) V^T with singular values log-spaced from 1 down to `smallest`
// (U, V: Gram-Schmidt of Gaussian matrices).
Mat SpreadSpectrum(int64_t p, int64_t q, double smallest, uint64_t seed) {
  const int64_t k = std::min(p, q);
  auto orthonormal_columns = [&](int64_t rows, uint64_t s) {
    Mat a(rows, k);
    a.a = testing::RandomNormal(a.a.size(), s);
    for (int64_t j = 0; j < k; ++j) {
      for (int pass = 0; pass < 2; ++pass) {  // twice is enough for float64
        for (int64_t l = 0; l < j; ++l) {
          double dot = 0.0;
          for (int64_t i = 0; i < rows; ++i) dot += a.at(i, j) * a.at(i, l);
          for (int64_t i = 0; i < rows; ++i) a.at(i, j) -= dot * a.at(i, l);
        }
      }
      double nrm = 0.0;
      for (int64_t i = 0; i < rows; ++i) nrm += a.at(i, j) * a.at(i, j);
      nrm = std::sqrt(nrm);
      for (int64_t i = 0; i < rows; ++i) a.at(i, j) /= nrm;
    }
    return a;
  };
  const Mat u = orthonormal_columns(p, seed), v = orthonormal_columns(q, seed + 1);
  Mat x(p, q);
  for (int64_t l = 0; l < k; ++l) {
    const double s = std::pow(smallest, static_cast<double>(l) / static_cast<double>(k - 1));
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < q; ++j) x.at(i, j) += s * u.at(i, l) * v.at(j, l);
  }
  return x;
}

// ||O O^T - I||_F on the short side (O^T O for a tall O).
double OrthogonalityError(const Mat& o) {
  const Mat g = o.r <= o.c ? Product(o, Transposed(o)) : Product(Transposed(o), o);
  double s = 0.0;
  for (int64_t i = 0; i < g.r; ++i)
    for (int64_t j = 0; j < g.c; ++j) {
      const double d = g.at(i, j) - (i == j ? 1.0 : 0.0);
      s += d * d;
    }
  return std::sqrt(s);
}

Mat RefNs(kernels::NsCoeffSet set, int steps, const Mat& x) {
  Mat o(x.r, x.c);
  kernels::ref::NewtonSchulz(set, steps, x.r, x.c, x.a.data(), o.a.data());
  return o;
}

Mat FastNs(kernels::NsCoeffSet set, int steps, const Mat& x) {
  std::vector<float> xf(x.a.begin(), x.a.end());
  kernels::fast::NsWorkspace ws;
  const float* out = kernels::fast::NewtonSchulz(set, steps, x.r, x.c, xf.data(), &ws);
  Mat o(x.r, x.c);
  std::copy(out, out + x.r * x.c, o.a.begin());
  return o;
}

TEST(crosscheck, PolarExpressBeatsJordanAtEqualSteps) {
  using kernels::NsCoeffSet;
  // Wide and tall, with condition numbers 1e2 and 1e3 (a gradient's spectrum spreads like
  // this; a flat spectrum would make every set look good).
  struct Shape {
    int64_t p, q;
    double smallest;
  };
  const Shape shapes[] = {{24, 64, 1e-2}, {64, 24, 1e-3}, {32, 48, 1e-3}};
  for (const Shape& s : shapes) {
    const Mat x = SpreadSpectrum(s.p, s.q, s.smallest, 900 + s.p);
    for (int steps : {5, 6, 8, 10}) {
      const double pe_ref = OrthogonalityError(RefNs(NsCoeffSet::kPolarExpress, steps, x));
      const double jo_ref = OrthogonalityError(RefNs(NsCoeffSet::kJordan, steps, x));
      const double pe_fast = OrthogonalityError(FastNs(NsCoeffSet::kPolarExpress, steps, x));
      const double jo_fast = OrthogonalityError(FastNs(NsCoeffSet::kJordan, steps, x));
      std::cout << "[ measured ] " << s.p << "x" << s.q << " kappa " << 1.0 / s.smallest << ", "
                << steps << " steps: polar_express " << pe_ref << " (fast " << pe_fast
                << "), jordan " << jo_ref << " (fast " << jo_fast << ")\n";
      EXPECT_LT(pe_ref, jo_ref) << s.p << "x" << s.q << ", " << steps << " steps";
      EXPECT_LT(pe_fast, jo_fast) << s.p << "x" << s.q << ", " << steps << " steps";
      // The float32 path computes the same iteration: its error differs from float64's
      // by rounding only.
      EXPECT_NEAR(pe_fast, pe_ref, 1e-3 * std::max(1.0, pe_ref));
      EXPECT_NEAR(jo_fast, jo_ref, 1e-3 * std::max(1.0, jo_ref));
    }
  }
}

// The library's Newton-Schulz with the quintic and Jordan sets is the iteration written
// above (this pins the coefficients and the normalisation the Muon cross-check relies on).
TEST(crosscheck, NewtonSchulzMatchesIndependent) {
  using kernels::NsCoeffSet;
  for (const auto& [p, q] : std::vector<std::pair<int64_t, int64_t>>{{7, 19}, {23, 6}, {1, 11}, {16, 16}}) {
    Mat x(p, q);
    x.a = testing::RandomNormal(x.a.size(), 77 + p, 0.3);
    for (int steps : {1, 5, 7, 10}) {
      const Mat want_q = NewtonSchulz(x, kQuinticSet, steps);
      const Mat want_j = NewtonSchulz(x, kJordanSet, steps);
      EXPECT_LE(RelMaxError(RefNs(NsCoeffSet::kQuintic, steps, x).a, want_q.a), kRefTol);
      EXPECT_LE(RelMaxError(RefNs(NsCoeffSet::kJordan, steps, x).a, want_j.a), kRefTol);
      // One NS in float32: a few ulps per product, amplified by the cubic iteration.
      EXPECT_LE(RelMaxError(FastNs(NsCoeffSet::kQuintic, steps, x).a, want_q.a), 1e-5);
      EXPECT_LE(RelMaxError(FastNs(NsCoeffSet::kJordan, steps, x).a, want_j.a), 1e-5);
    }
  }
}

// ---------------------------------------------------------------------------------------
// (e) lr_scale multiplies lr and gain_lr: stepping with lr_scale = 0.5 is stepping a group
// whose lr and gain_lr are halved. Halving is exact in binary floating point (0.5 * fl(x) =
// fl(x / 2)), so the two runs must agree bit for bit, not just to a tolerance.

struct HalfCase {
  std::string spec, halved;
  bool vectors;  // adamw bases also take 1-D tensors
};

std::vector<HalfCase> HalfCases() {
  return {{"preset=md-muon", "preset=md-muon lr=0.004 gain_lr=0.0005", false},
          {"preset=md-adamw", "preset=md-adamw lr=0.0005 gain_lr=0.0005", true},
          {"preset=muon", "preset=muon lr=0.01", false},
          {"preset=adamw", "preset=adamw lr=0.0005", true},
          {"preset=router", "preset=router lr=0.004 gain_lr=0.0005", false},
          {"preset=embedding", "preset=embedding lr=0.0015", true},
          {"preset=md-muon gains=scalar gain_param=exp gain_lr=0.02",
           "preset=md-muon gains=scalar gain_param=exp lr=0.004 gain_lr=0.01", false}};
}

class LrScale : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(LrScale, HalfEqualsHalvedGroup) {
  const HalfCase c = HalfCases()[std::get<0>(GetParam())];
  const std::string engine = kEngines[std::get<1>(GetParam())];
  SCOPED_TRACE(c.spec + " " + engine);
  const uint64_t seed = 600 + std::get<0>(GetParam());
  std::vector<TensorSpec> tensors = {{"wide", {7, 19}}, {"tall", {23, 6}}, {"stack", {3, 5, 8}}};
  if (c.vectors) tensors.push_back({"vec", {13}});
  AbiHarness scaled(engine, c.spec, tensors, seed);
  AbiHarness halved(engine, c.halved, tensors, seed);
  MDOPT_ASSERT_OK(mdopt_finalize(scaled.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(halved.opt()));
  const testing::Snapshot before = testing::Take(scaled);
  for (int step = 1; step <= 10; ++step) {
    scaled.SetGradients(seed, step);
    halved.SetGradients(seed, step);
    MDOPT_ASSERT_OK(mdopt_step(scaled.opt(), 0.5, nullptr, nullptr));
    MDOPT_ASSERT_OK(mdopt_step(halved.opt(), 1.0, nullptr, nullptr));
    ASSERT_TRUE(testing::BitwiseEqual(testing::Take(scaled), testing::Take(halved)))
        << "after step " << step;
  }
  // Guard against a vacuous pass: the steps did move the weights.
  EXPECT_FALSE(testing::BitwiseEqual(testing::Take(scaled), before));
}

INSTANTIATE_TEST_SUITE_P(crosscheck, LrScale,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(HalfCases().size())),
                                            ::testing::Range(0, 2)),
                         [](const auto& info) {
                           return CaseName(HalfCases()[std::get<0>(info.param)].spec,
                                           std::get<1>(info.param));
                         });

}  // namespace
}  // namespace mdopt
