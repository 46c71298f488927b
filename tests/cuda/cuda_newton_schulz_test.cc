// NewtonSchulzRunner (kernels/cuda/newton_schulz.h) against cuda_ns_reference.h, its
// plain-loop twin that rounds to bf16 exactly where the kernel does ("the mirror"), and, in
// the float32 mode, against kernels/reference's float64 NewtonSchulz.
//
// The bounds, set before any GPU run (DESIGN.md section 6: never loosened to make one pass).
//
// What differs between the GPU and the mirror. Both round the same expressions at the same
// points; the GPU sums each product in float32 (error up to K 2^-24 of sum |terms|, K <= 256
// here), the mirror in float64. The two round to different bf16 values only where the
// float32 and float64 sums straddle a rounding boundary (spacing 2^-8 to 2^-7 of the value):
// with probability about K 2^-16 (sum |terms| / |sum|) per element, by one ulp. (The float32
// scaling of Z_0 and bf16 x bf16 products are exact or identical on both sides.)
//
// Why there is no tight elementwise bound after 5 steps. Newton-Schulz multiplies a
// perturbation of X_k along a singular value sigma by |p_k'(sigma)| in every later
// iteration: a_k for small sigma (3.4 to 4.1 for quintic and jordan, 8.2 then 4.1 for
// polar_express) and about 2 near sigma = 1 for quintic. A one-ulp flip in iteration 0 is
// thus multiplied by about 4^4 by iteration 5, its own later roundings flip further values,
// and the GPU's and the mirror's bf16 trajectories decorrelate down to the size of bf16
// rounding noise itself. Measured with the float32 models of the mirror (NsAccum::kFloat
// and kFloatBlocked, the GPU's arithmetic on the CPU) on these shapes, 20 input draws each:
// elementwise 5-step differences up to 0.85% (standard) and 3.6% (Gram, polar_express), as
// large as a shifted coefficient tuple (2.1% at the least). So the test checks three things:
//
// 1. Two steps, elementwise: ||O - O_mirror||_F / ||O_mirror||_F <= kTwoStepBound = 5e-3.
//    Estimate: p <= 256 2^-16 4 = 1.6e-2 (K <= 256, sum|terms|/|sum| <= 4 for all but a few
//    elements), one ulp ~ 2^-8 relative, so each stored matrix carries sqrt(p) 2^-8 = 5e-4
//    relative; two steps store six (A, B, Z twice), the first step's three amplified by
//    a_1 <= 4.1 in the second: 5e-4 sqrt(3 * 4.1^2 + 3) = 3.7e-3, within 5e-3. The float32
//    models measured at most 6.4e-4. A dropped iteration is >= 41% off at two steps, a
//    shifted tuple >= 5% (both checked below on these very inputs to exceed 2x the bound).
// 2. Five steps, the spectrum: the RMS of the differences of the sorted singular values
//    <= kSpectrumBound (5e-3 for quintic and jordan, 1.2e-2 for polar_express). Singular
//    values ignore how noise rotates the output's singular vectors, and a flip's first-order
//    effect on sigma_i is u_i^T E v_i, one of the s x l directions E spreads over: what
//    remains is the amplified part along the spectrum. The float32 models measured at most
//    1.1e-3 (quintic), 1.7e-3 (jordan), 3.1e-3 (polar_express), in proportion to the product
//    of the set's a_k (about 490 for quintic and jordan, 980 for polar_express); the bounds
//    are 3 to 4x those. A dropped iteration moves the spectrum by >= 2.8e-2, a shifted
//    tuple by >= 1.4e-2 (quintic) and 6.7e-2 (polar_express): >= 2x the bound (checked below).
//    jordan has one tuple, so a shifted tuple is the same tuple: only the drop applies.
// 3. Five steps, elementwise, the catch-all for what the spectrum cannot see (wrong
//    orientation, mixed-up matrices): ||O - O_mirror|| <= 2 ||O_mirror - O_exact||, O_exact
//    the float64 NS without rounding. Two bf16 trajectories of one algorithm each carry bf16
//    noise of about that size; fully decorrelated they differ by sqrt(2) of it, and at
//    worst by 2x. The models measured up to 0.8x.
// The float32 mode against kernels/reference (float64): 1e-4 relative Frobenius. float32
// accumulation (2^-24 per operation, no TF32) amplified as above: the CPU's float32 path
// measured <= 6e-6 at 5 steps, the float32 model here likewise; a dropped or shifted tuple
// is > 1e-2 off.
//
// The CPU tests below (they need no GPU and never skip) compute the mutated mirrors on the
// GPU tests' own inputs and show each differs from the true mirror by more than 2x its bound,
// and that the float32 models stay inside the bounds.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_ns_reference.h"
#include "cuda_test_util.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/cuda/newton_schulz.h"
#include "kernels/reference/reference.h"

namespace mdopt {
namespace kernels {
// gtest prints parameters by name (not their bytes) in test lists and failures.
void PrintTo(NsCoeffSet set, std::ostream* os) {
  *os << (set == NsCoeffSet::kQuintic ? "quintic" : set == NsCoeffSet::kJordan ? "jordan" : "polar_express");
}
}  // namespace kernels
namespace {

using kernels::NsCoeffSet;
using kernels::NsForm;
using kernels::cuda::NewtonSchulzRunner;
using testing::NsAccum;
using testing::NsMirror;
using testing::NsRefOptions;

constexpr double kTwoStepBound = 5e-3;
constexpr double kFiveStepElementFactor = 2.0;
constexpr double kF32Bound = 1e-4;
constexpr int kSteps = 5;
constexpr int kBatch = 3;

double SpectrumBound(NsCoeffSet set) { return set == NsCoeffSet::kPolarExpress ? 1.2e-2 : 5e-3; }

struct Case {
  int64_t m, n;
  NsForm form;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.m << "x" << c.n << (c.form == NsForm::kGram ? " gram" : c.form == NsForm::kStandard ? " standard" : " auto");
}

// Standard: wide, tall, square, odd; Gram (aspect >= 2): wide, tall, odd, and aspect 1.5.
const Case kCases[] = {{64, 96, NsForm::kStandard}, {96, 64, NsForm::kStandard},
                       {128, 128, NsForm::kStandard}, {33, 47, NsForm::kStandard},
                       {32, 256, NsForm::kGram},     {256, 32, NsForm::kGram},
                       {17, 61, NsForm::kGram},      {64, 96, NsForm::kGram}};
const NsCoeffSet kSets[] = {NsCoeffSet::kQuintic, NsCoeffSet::kJordan, NsCoeffSet::kPolarExpress};

const char* SetName(NsCoeffSet set) {
  return set == NsCoeffSet::kQuintic ? "quintic" : set == NsCoeffSet::kJordan ? "jordan" : "polar_express";
}

std::string CaseName(const Case& c, NsCoeffSet set) {
  return "m" + std::to_string(c.m) + "_n" + std::to_string(c.n) +
         (c.form == NsForm::kGram ? "_gram_" : "_standard_") + SetName(set);
}

// Odd shapes also get a stride past m * n: matrices that start at any float.
int64_t StrideOf(const Case& c) { return (c.m * c.n) % 2 == 1 ? c.m * c.n + 3 : c.m * c.n; }

// Matrix b of a case: Gaussian, its own draw and scale (each is normalised by its own norm).
// Inputs, references and spectra are computed once per process: the GPU tests reuse what the
// CPU tests computed.
const std::vector<float>& Input(const Case& c, int b) {
  static std::map<std::tuple<int64_t, int64_t, int>, std::vector<float>> cache;
  std::vector<float>& x = cache[{c.m, c.n, b}];
  if (x.empty()) {
    const std::vector<double> v = testing::RandomNormal(static_cast<size_t>(c.m * c.n),
                                                        1000 * c.m + 10 * c.n + b, 0.1 * (b + 1));
    x.assign(v.begin(), v.end());
  }
  return x;
}

// The mirror of matrix b of a case (mutated by tuple_offset, or its float32 models).
const std::vector<double>& Mirror(NsCoeffSet set, int steps, const Case& c, int b, bool bf16 = true,
                                  int tuple_offset = 0, NsAccum acc = NsAccum::kDouble) {
  using Key = std::tuple<int64_t, int64_t, NsForm, int, NsCoeffSet, int, bool, int, NsAccum>;
  static std::map<Key, std::vector<double>> cache;
  std::vector<double>& out = cache[Key{c.m, c.n, c.form, b, set, steps, bf16, tuple_offset, acc}];
  if (out.empty()) {
    NsRefOptions o;
    o.form = c.form;
    o.bf16 = bf16;
    o.tuple_offset = tuple_offset;
    o.accum = acc;
    out = NsMirror(set, steps, c.m, c.n, Input(c, b).data(), o);
  }
  return out;
}

// kernels/reference's float64 NS of matrix b of a case.
const std::vector<double>& Exact(NsCoeffSet set, int steps, const Case& c, int b) {
  static std::map<std::tuple<int64_t, int64_t, int, NsCoeffSet, int>, std::vector<double>> cache;
  std::vector<double>& out = cache[{c.m, c.n, b, set, steps}];
  if (out.empty()) {
    const std::vector<float>& x = Input(c, b);
    const std::vector<double> xd(x.begin(), x.end());
    out.resize(xd.size());
    kernels::ref::NewtonSchulz(set, steps, c.m, c.n, xd.data(), out.data());
  }
  return out;
}

// The singular values of a cached reference (by address: the caches never move an entry).
const std::vector<double>& Spectrum(const std::vector<double>& o, const Case& c) {
  static std::map<const std::vector<double>*, std::vector<double>> cache;
  std::vector<double>& sv = cache[&o];
  if (sv.empty()) sv = testing::SingularValues(o, c.m, c.n);
  return sv;
}

// RMS difference of the sorted singular values of `got` and the cached reference `want`.
template <typename A>
double SpectrumRms(const std::vector<A>& got, const std::vector<double>& want, const Case& c) {
  const std::vector<double> a = testing::SingularValues(std::vector<double>(got.begin(), got.end()), c.m, c.n);
  const std::vector<double>& b = Spectrum(want, c);
  double e = 0.0;
  for (size_t i = 0; i < a.size(); ++i) e += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(e / static_cast<double>(a.size()));
}

// ---- without a GPU: the reference, its mutations, the arithmetic of the API -------------

TEST(CudaNsMirror, ExactVariantIsTheFloat64Reference) {
  // Without rounding, both forms are kernels/reference's NS (the Gram sequence is exact).
  for (const Case& c : kCases)
    for (NsCoeffSet set : kSets) {
      EXPECT_LE(testing::RelFrobError(Mirror(set, kSteps, c, 0, false), Exact(set, kSteps, c, 0)), 1e-12)
          << CaseName(c, set);
    }
}

TEST(CudaNsMirror, Bf16VariantStaysNearFloat64) {
  // Sanity: bf16 rounding at every stored matrix keeps within the CPU bf16 path's 8%.
  for (const Case& c : kCases)
    for (NsCoeffSet set : kSets) {
      EXPECT_LE(testing::RelFrobError(Mirror(set, kSteps, c, 1), Exact(set, kSteps, c, 1)), 8e-2)
          << CaseName(c, set);
    }
}

// Every bound is at least 2x below what a dropped iteration or a shifted tuple does, on the
// very inputs of the GPU tests.
TEST(CudaNsMirror, MutationsExceedTheBounds) {
  for (const Case& c : kCases)
    for (NsCoeffSet set : kSets)
      for (int b = 0; b < kBatch; ++b) {
        const std::string what = CaseName(c, set) + " matrix " + std::to_string(b);
        const bool shifts = set != NsCoeffSet::kJordan;  // jordan: one tuple for every step
        const std::vector<double>& two = Mirror(set, 2, c, b);
        EXPECT_GT(testing::RelFrobError(Mirror(set, 1, c, b), two), 2 * kTwoStepBound) << what;
        if (shifts) {
          EXPECT_GT(testing::RelFrobError(Mirror(set, 2, c, b, true, 1), two), 2 * kTwoStepBound) << what;
        }
        const std::vector<double>& five = Mirror(set, kSteps, c, b);
        EXPECT_GT(SpectrumRms(Mirror(set, kSteps - 1, c, b), five, c), 2 * SpectrumBound(set)) << what;
        if (shifts) {
          EXPECT_GT(SpectrumRms(Mirror(set, kSteps, c, b, true, 1), five, c), 2 * SpectrumBound(set)) << what;
        }
        const std::vector<double>& exact = Exact(set, kSteps, c, b);
        EXPECT_GT(testing::RelFrobError(Mirror(set, kSteps - 1, c, b, false), exact), 2 * kF32Bound) << what;
        if (shifts) {
          EXPECT_GT(testing::RelFrobError(Mirror(set, kSteps, c, b, false, 1), exact), 2 * kF32Bound) << what;
        }
      }
}

// The GPU's arithmetic modelled on the CPU (float32 sums, two orders) lands inside every
// bound with room: half of it for the tight ones.
TEST(CudaNsMirror, Float32AccumulationStaysInsideTheBounds) {
  for (const Case& c : kCases)
    for (NsCoeffSet set : kSets)
      for (int b = 0; b < kBatch; ++b) {
        const std::string what = CaseName(c, set) + " matrix " + std::to_string(b);
        const std::vector<double>& two = Mirror(set, 2, c, b);
        const std::vector<double>& five = Mirror(set, kSteps, c, b);
        const double noise = testing::RelFrobError(five, Exact(set, kSteps, c, b));
        for (NsAccum acc : {NsAccum::kFloat, NsAccum::kFloatBlocked}) {
          EXPECT_LE(testing::RelFrobError(Mirror(set, 2, c, b, true, 0, acc), two), kTwoStepBound / 2) << what;
          const std::vector<double>& model = Mirror(set, kSteps, c, b, true, 0, acc);
          EXPECT_LE(SpectrumRms(model, five, c), SpectrumBound(set) / 2) << what;
          EXPECT_LE(testing::RelFrobError(model, five), kFiveStepElementFactor * noise) << what;
        }
        EXPECT_LE(testing::RelFrobError(Mirror(set, kSteps, c, b, false, 0, NsAccum::kFloat),
                                        Exact(set, kSteps, c, b)),
                  kF32Bound / 4)
            << what;
      }
}

TEST(CudaNsArithmetic, ResolveFollowsTheCpuRule) {
  EXPECT_EQ(NewtonSchulzRunner::Resolve(NsForm::kAuto, 64, 128), NsForm::kGram);
  EXPECT_EQ(NewtonSchulzRunner::Resolve(NsForm::kAuto, 128, 64), NsForm::kGram);
  EXPECT_EQ(NewtonSchulzRunner::Resolve(NsForm::kAuto, 64, 127), NsForm::kStandard);
  EXPECT_EQ(NewtonSchulzRunner::Resolve(NsForm::kAuto, 64, 64), NsForm::kStandard);
  EXPECT_EQ(NewtonSchulzRunner::Resolve(NsForm::kStandard, 16, 256), NsForm::kStandard);
  EXPECT_EQ(NewtonSchulzRunner::Resolve(NsForm::kGram, 64, 64), NsForm::kGram);
}

// Restores the batch split on scope exit.
struct MaxBatchPerCall {
  explicit MaxBatchPerCall(int64_t max) { NewtonSchulzRunner::SetMaxBatchPerCallForTesting(max); }
  ~MaxBatchPerCall() { NewtonSchulzRunner::SetMaxBatchPerCallForTesting(0); }
};

// The formula of docs/cuda.md, computed without a device (this runs with none).
TEST(CudaNsArithmetic, WorkspaceBytesFollowTheLayout) {
  const auto up = [](int64_t v, int64_t k) { return (v + k - 1) / k * k; };
  const auto formula = [&](int64_t nb, int64_t m, int64_t n, bool gram, int64_t e) {
    const int64_t s = std::min(m, n);
    const int64_t chunks = std::clamp<int64_t>((m * n + 2047) / 2048, 1, 1024);
    const int64_t z = up(m * up(n, 8) * e, 256), sq = up(s * up(s, 8) * e, 256);
    return (int64_t{32} << 20) + up(nb * chunks * 8, 256) + up(nb * 4, 256) +
           (gram ? 1 : 2) * up(nb * z, 256) + (gram ? 4 : 2) * up(nb * sq, 256);
  };
  EXPECT_EQ(NewtonSchulzRunner::WorkspaceBytes(3, 33, 47, NsForm::kStandard, true), formula(3, 33, 47, false, 2));
  EXPECT_EQ(NewtonSchulzRunner::WorkspaceBytes(3, 33, 47, NsForm::kStandard, false), formula(3, 33, 47, false, 4));
  EXPECT_EQ(NewtonSchulzRunner::WorkspaceBytes(8, 8192, 2048, NsForm::kAuto, true), formula(8, 8192, 2048, true, 2));
  EXPECT_EQ(NewtonSchulzRunner::WorkspaceBytes(32, 2048, 2048, NsForm::kAuto, true),
            formula(32, 2048, 2048, false, 2));
  EXPECT_EQ(NewtonSchulzRunner::WorkspaceBytes(0, 4, 4, NsForm::kAuto, true), 0);
  // A split batch needs one call's worth.
  const MaxBatchPerCall two(2);
  EXPECT_EQ(NewtonSchulzRunner::WorkspaceBytes(5, 17, 61, NsForm::kGram, true), formula(2, 17, 61, true, 2));
}

TEST(CudaNsArithmetic, FlopsCountEveryProduct) {
  // Standard: per iteration Z Z^T and B Z (2 s^2 l each), A A (2 s^3).
  EXPECT_DOUBLE_EQ(NewtonSchulzRunner::Flops(5, 2, 64, 96, NsForm::kStandard),
                   2.0 * 5 * (4.0 * 64 * 64 * 96 + 2.0 * 64 * 64 * 64));
  // Gram: A_0 and O (2 s^2 l each); A A every iteration, (P A) P and P Q in all but one.
  EXPECT_DOUBLE_EQ(NewtonSchulzRunner::Flops(5, 1, 256, 32, NsForm::kAuto),
                   4.0 * 32 * 32 * 256 + 2.0 * 32 * 32 * 32 * (5 + 2 * 4 + 4));
}

// ---- on a GPU ---------------------------------------------------------------------------

// Device buffers for one Run: the matrices inside guard bands, the workspace inside guard
// bands, every guard and gap filled with a pattern Run must leave alone.
class GpuRun {
 public:
  static constexpr int64_t kGuardFloats = 1024;
  static constexpr int64_t kGuardBytes = 4096;  // keeps the workspace 256-byte aligned
  static constexpr float kSentinel = -1234.5f;

  GpuRun(const Case& c, int64_t batch, int64_t stride, bool bf16, NsForm form)
      : c_(c), batch_(batch), stride_(stride), bf16_(bf16), form_(form),
        ws_bytes_(NewtonSchulzRunner::WorkspaceBytes(batch, c.m, c.n, form, bf16)),
        x_(static_cast<size_t>(2 * kGuardFloats + batch * stride)),
        ws_(static_cast<size_t>(2 * kGuardBytes + ws_bytes_)) {}

  bool ok() const { return x_.get() != nullptr && ws_.get() != nullptr; }
  int64_t workspace_bytes() const { return ws_bytes_; }
  float* x() const { return x_.get() + kGuardFloats; }
  void* workspace() const { return ws_.get() + kGuardBytes; }

  void Upload(const std::vector<std::vector<float>>& in) {
    std::vector<float> h(x_.size(), kSentinel);
    for (int64_t b = 0; b < batch_; ++b)
      std::copy(in[static_cast<size_t>(b)].begin(), in[static_cast<size_t>(b)].end(),
                h.begin() + kGuardFloats + b * stride_);
    host_ = h;
    cudaMemcpy(x_.get(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemset(ws_.get(), 0xA5, ws_.size());
  }

  kernels::cuda::DeviceStatus Run(NewtonSchulzRunner& ns, NsCoeffSet set, int steps) {
    return ns.Run(set, steps, batch_, c_.m, c_.n, x(), stride_, form_, bf16_, workspace(), ws_bytes_,
                  nullptr);
  }

  // Matrix b after Run (call after cudaDeviceSynchronize).
  std::vector<float> Output(int64_t b) {
    if (out_.empty()) out_ = x_.Download();
    const auto first = out_.begin() + kGuardFloats + b * stride_;
    return std::vector<float>(first, first + c_.m * c_.n);
  }

  // Everything outside the matrices and the workspace is as uploaded.
  void ExpectGuardsIntact() {
    if (out_.empty()) out_ = x_.Download();
    int64_t changed = 0;
    for (size_t e = 0; e < out_.size(); ++e) {
      const int64_t rel = static_cast<int64_t>(e) - kGuardFloats;
      const bool inside = rel >= 0 && rel < batch_ * stride_ && rel % stride_ < c_.m * c_.n;
      if (!inside && std::memcmp(&out_[e], &host_[e], sizeof(float)) != 0) ++changed;
    }
    EXPECT_EQ(changed, 0) << "floats written outside the matrices";
    const std::vector<uint8_t> w = ws_.Download();
    int64_t touched = 0;
    for (int64_t e = 0; e < kGuardBytes; ++e) {
      touched += w[static_cast<size_t>(e)] != 0xA5;
      touched += w[static_cast<size_t>(kGuardBytes + ws_bytes_ + e)] != 0xA5;
    }
    EXPECT_EQ(touched, 0) << "bytes written outside the workspace";
  }

 private:
  Case c_;
  int64_t batch_, stride_;
  bool bf16_;
  NsForm form_;
  int64_t ws_bytes_;
  testing::DeviceVec<float> x_;
  testing::DeviceVec<uint8_t> ws_;
  std::vector<float> host_, out_;
};

std::vector<std::vector<float>> Inputs(const Case& c, int64_t batch) {
  std::vector<std::vector<float>> in;
  for (int64_t b = 0; b < batch; ++b) in.push_back(Input(c, static_cast<int>(b)));
  return in;
}

class CudaNs : public ::testing::TestWithParam<std::tuple<Case, NsCoeffSet>> {
 protected:
  void SetUp() override {
    MDOPT_SKIP_WITHOUT_GPU();
    MDOPT_ASSERT_DEVICE_OK(NewtonSchulzRunner::Create(&ns_));
  }
  std::unique_ptr<NewtonSchulzRunner> ns_;
};

// Bound 1 (two steps, elementwise) on a batch of three, then bounds 2 and 3 (five steps), each
// matrix against its own mirror; Run leaves the guard bands alone.
TEST_P(CudaNs, Bf16MatchesTheMirror) {
  const auto [c, set] = GetParam();
  const std::vector<std::vector<float>> in = Inputs(c, kBatch);
  GpuRun run(c, kBatch, StrideOf(c), true, c.form);
  ASSERT_TRUE(run.ok());
  MDOPT_ASSERT_DEVICE_OK(ns_->Prepare(kBatch, c.m, c.n, c.form, true));
  run.Upload(in);
  MDOPT_ASSERT_DEVICE_OK(run.Run(*ns_, set, 2));
  MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::string name = CaseName(c, set);
  for (int b = 0; b < kBatch; ++b) {
    const double e = testing::RelFrobError(run.Output(b), Mirror(set, 2, c, b));
    testing::PrintMetric("ns.two_steps." + name, e, kTwoStepBound);
    EXPECT_LE(e, kTwoStepBound) << "two steps, matrix " << b;
  }
  run.ExpectGuardsIntact();

  GpuRun five(c, kBatch, StrideOf(c), true, c.form);
  ASSERT_TRUE(five.ok());
  five.Upload(in);
  MDOPT_ASSERT_DEVICE_OK(five.Run(*ns_, set, kSteps));
  MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
  for (int b = 0; b < kBatch; ++b) {
    const std::vector<float> got = five.Output(b);
    const std::vector<double>& want = Mirror(set, kSteps, c, b);
    const double spectrum = SpectrumRms(got, want, c);
    testing::PrintMetric("ns.spectrum." + name, spectrum, SpectrumBound(set));
    EXPECT_LE(spectrum, SpectrumBound(set)) << "five steps, matrix " << b;
    // Elementwise, as a multiple of the mirror's own distance from float64.
    const double ratio = testing::RelFrobError(got, want) / testing::RelFrobError(want, Exact(set, kSteps, c, b));
    testing::PrintMetric("ns.five_steps_vs_bf16_noise." + name, ratio, kFiveStepElementFactor);
    EXPECT_LE(ratio, kFiveStepElementFactor) << "five steps, matrix " << b;
  }
  five.ExpectGuardsIntact();
}

TEST_P(CudaNs, Float32MatchesTheFloat64Reference) {
  const auto [c, set] = GetParam();
  const std::vector<std::vector<float>> in = Inputs(c, kBatch);
  GpuRun run(c, kBatch, StrideOf(c), false, c.form);
  ASSERT_TRUE(run.ok());
  run.Upload(in);
  MDOPT_ASSERT_DEVICE_OK(run.Run(*ns_, set, kSteps));
  MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
  for (int b = 0; b < kBatch; ++b) {
    const double e = testing::RelFrobError(run.Output(b), Exact(set, kSteps, c, b));
    testing::PrintMetric("ns.f32." + CaseName(c, set), e, kF32Bound);
    EXPECT_LE(e, kF32Bound) << "matrix " << b;
  }
  run.ExpectGuardsIntact();
}

// Fixed algorithms, fixed-order norms, no atomics: a second run gives the same bits.
TEST_P(CudaNs, SameInputSameBits) {
  const auto [c, set] = GetParam();
  const std::vector<std::vector<float>> in = Inputs(c, kBatch);
  for (bool bf16 : {true, false}) {
    std::vector<float> first;
    for (int rep = 0; rep < 2; ++rep) {
      GpuRun run(c, kBatch, StrideOf(c), bf16, c.form);
      ASSERT_TRUE(run.ok());
      run.Upload(in);
      MDOPT_ASSERT_DEVICE_OK(run.Run(*ns_, set, kSteps));
      MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
      std::vector<float> all;
      for (int b = 0; b < kBatch; ++b) {
        const std::vector<float> o = run.Output(b);
        all.insert(all.end(), o.begin(), o.end());
      }
      if (rep == 0) {
        first = all;
      } else {
        EXPECT_EQ(0, std::memcmp(first.data(), all.data(), all.size() * sizeof(float)))
            << (bf16 ? "bf16" : "f32");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaNs,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::ValuesIn(kSets)),
                         [](const ::testing::TestParamInfo<std::tuple<Case, NsCoeffSet>>& info) {
                           return CaseName(std::get<0>(info.param), std::get<1>(info.param));
                         });

class CudaNsRunner : public ::testing::Test {
 protected:
  void SetUp() override {
    MDOPT_SKIP_WITHOUT_GPU();
    MDOPT_ASSERT_DEVICE_OK(NewtonSchulzRunner::Create(&ns_));
  }
  std::unique_ptr<NewtonSchulzRunner> ns_;
};

// At most two matrices per call: a batch of five runs as 2 + 2 + 1, each call with its own
// algorithms (the last call's batch differs), every matrix still within bound 1.
TEST_F(CudaNsRunner, SplitsLargeBatches) {
  const MaxBatchPerCall two(2);
  for (const Case& c : {Case{33, 47, NsForm::kStandard}, Case{17, 61, NsForm::kGram}}) {
    const std::vector<std::vector<float>> in = Inputs(c, 5);
    GpuRun run(c, 5, StrideOf(c), true, c.form);
    ASSERT_TRUE(run.ok());
    EXPECT_EQ(run.workspace_bytes(), NewtonSchulzRunner::WorkspaceBytes(2, c.m, c.n, c.form, true));
    MDOPT_ASSERT_DEVICE_OK(ns_->Prepare(5, c.m, c.n, c.form, true));
    run.Upload(in);
    MDOPT_ASSERT_DEVICE_OK(run.Run(*ns_, NsCoeffSet::kQuintic, 2));
    MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
    for (int b = 0; b < 5; ++b)
      EXPECT_LE(testing::RelFrobError(run.Output(b), Mirror(NsCoeffSet::kQuintic, 2, c, b)),
                kTwoStepBound)
          << CaseName(c, NsCoeffSet::kQuintic) << " matrix " << b;
    run.ExpectGuardsIntact();
  }
}

// kAuto picks the form by shape, as the CPU does: 32 x 256 runs the Gram sequence, 64 x 96
// the standard one.
TEST_F(CudaNsRunner, AutoPicksTheFormByShape) {
  for (const Case& c : {Case{32, 256, NsForm::kGram}, Case{64, 96, NsForm::kStandard}}) {
    const std::vector<std::vector<float>> in = Inputs(c, 1);
    GpuRun run(c, 1, c.m * c.n, true, NsForm::kAuto);
    ASSERT_TRUE(run.ok());
    run.Upload(in);
    MDOPT_ASSERT_DEVICE_OK(run.Run(*ns_, NsCoeffSet::kQuintic, 2));
    MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_LE(testing::RelFrobError(run.Output(0), Mirror(NsCoeffSet::kQuintic, 2, c, 0)), kTwoStepBound)
        << CaseName(c, NsCoeffSet::kQuintic);
  }
}

TEST_F(CudaNsRunner, RefusesBadArguments) {
  const int64_t m = 8, n = 16;
  const int64_t bytes = NewtonSchulzRunner::WorkspaceBytes(1, m, n, NsForm::kStandard, true);
  testing::DeviceVec<float> x(static_cast<size_t>(m * n));
  testing::DeviceVec<uint8_t> ws(static_cast<size_t>(bytes + 256));
  ASSERT_NE(x.get(), nullptr);
  ASSERT_NE(ws.get(), nullptr);
  MDOPT_ASSERT_CUDA(cudaMemset(x.get(), 0, static_cast<size_t>(m * n) * sizeof(float)));
  const auto run = [&](int steps, int64_t batch, int64_t mm, int64_t nn, float* xp, int64_t stride,
                       void* w, int64_t wb) {
    return ns_->Run(NsCoeffSet::kQuintic, steps, batch, mm, nn, xp, stride, NsForm::kStandard, true, w, wb,
                    nullptr);
  };
  EXPECT_FALSE(run(5, 0, m, n, x.get(), m * n, ws.get(), bytes).ok());
  EXPECT_FALSE(run(5, 1, 0, n, x.get(), m * n, ws.get(), bytes).ok());
  EXPECT_FALSE(run(0, 1, m, n, x.get(), m * n, ws.get(), bytes).ok());
  EXPECT_FALSE(run(5, 1, m, n, nullptr, m * n, ws.get(), bytes).ok());
  EXPECT_FALSE(run(5, 1, m, n, x.get(), m * n - 1, ws.get(), bytes).ok());
  EXPECT_FALSE(run(5, 1, m, n, x.get(), m * n, ws.get(), bytes - 1).ok());
  EXPECT_FALSE(run(5, 1, m, n, x.get(), m * n, ws.get() + 16, bytes).ok());  // not 256-aligned
  EXPECT_FALSE(ns_->Prepare(0, m, n, NsForm::kAuto, true).ok());
  EXPECT_TRUE(run(5, 1, m, n, x.get(), m * n, ws.get(), bytes).ok());
  MDOPT_ASSERT_CUDA(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace mdopt
