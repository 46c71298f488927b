// Each stage of the CUDA backend against the same stage of the CPU backend (its twin, the
// float32 fast passes every CPU test holds to the float64 reference), on identical inputs:
// before every step the CPU backend's state is overwritten with the GPU's, and after the
// GPU's Newton-Schulz its O is handed to the CPU's Pass2, so a difference can come only from
// the stage compared, never from NS or from drift over earlier steps.
//
// Bound: 1e-5 of each array's largest value, for every f32 state array after pass 1, pass 2
// and finish. From the arithmetic: both devices evaluate the same md_elementwise.h functions
// in the same order; nvcc contracts a*b+c into FMAs (one rounding instead of two: at most
// 1 ulp, 6e-8, per contracted operation, a handful per element), the float64 sums differ in
// order only (relative 1e-15), and the few float64 scalars (gain values, Adam's bias
// corrections through pow) are correctly rounded to within 1 ulp on both. A chain of at
// most ~10 float32 operations per element stays below 1e-6; 1e-5 leaves 10x for Adam's
// division by sqrt(v) + eps where v is tiny. A dropped term (the weight decay, a gain, the
// tangent correction) changes the result by far more than that.
//
// Every test skips, with the CUDA runtime's reason, where no GPU is usable.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/backend.h"
#include "kernels/backend_factory.h"
#include "kernels/common/bf16.h"

namespace mdopt {
namespace {

using kernels::Base;
using kernels::BackendConfig;
using kernels::BucketDesc;
using kernels::Dtype;
using kernels::Gains;
using kernels::GainParam;
using kernels::ParamDesc;
using kernels::ParamPointers;
using kernels::SlotDesc;
using kernels::SlotRange;
using kernels::Sphere;
using kernels::StepBackend;
using kernels::UpdateRule;

constexpr double kStageBound = 1e-5;

struct Shape {
  int64_t experts, m, n;
};

// The rules the stages must handle: the presets and the variants they leave out.
struct Case {
  const char* name;
  UpdateRule rule;
};

UpdateRule Rule(Base base, Sphere sphere, Gains gains, double lr) {
  UpdateRule r;
  r.base = base;
  r.sphere = sphere;
  r.gains = gains;
  r.lr = lr;
  return r;
}

std::vector<Case> Cases() {
  std::vector<Case> c;
  c.push_back({"md_muon", Rule(Base::kMuon, Sphere::kFrobenius, Gains::kRowCol, 8e-3)});
  c.push_back({"md_adamw", Rule(Base::kAdamW, Sphere::kFrobenius, Gains::kRowCol, 1e-3)});
  UpdateRule muon = Rule(Base::kMuon, Sphere::kNone, Gains::kNone, 2e-2);
  muon.weight_decay = 0.1;
  muon.muon_scale = kernels::MuonScale::kMax1;
  c.push_back({"muon", muon});
  UpdateRule adamw = Rule(Base::kAdamW, Sphere::kNone, Gains::kNone, 1e-3);
  adamw.weight_decay = 0.1;
  c.push_back({"adamw", adamw});
  c.push_back({"router", Rule(Base::kMuon, Sphere::kRow, Gains::kRowCol, 8e-3)});
  UpdateRule emb = Rule(Base::kAdamW, Sphere::kRow, Gains::kNone, 3e-3);
  emb.radius_mode = kernels::RadiusMode::kValue;
  emb.radius_value = 1.0;
  c.push_back({"embedding", emb});
  c.push_back({"col_sphere_col_gains", Rule(Base::kAdamW, Sphere::kCol, Gains::kCol, 1e-3)});
  UpdateRule scalar = Rule(Base::kMuon, Sphere::kFrobenius, Gains::kScalar, 8e-3);
  scalar.gain_param = GainParam::kExp;
  scalar.nesterov = false;
  c.push_back({"scalar_gain_exp", scalar});
  UpdateRule tf = Rule(Base::kMuon, Sphere::kFrobenius, Gains::kRowCol, 8e-3);
  tf.tangent = true;
  c.push_back({"tangent_frobenius", tf});
  UpdateRule tr = Rule(Base::kAdamW, Sphere::kRow, Gains::kRow, 1e-3);
  tr.tangent = true;
  tr.gain_param = GainParam::kDirect;
  c.push_back({"tangent_row", tr});
  UpdateRule tc = Rule(Base::kAdamW, Sphere::kCol, Gains::kRowCol, 1e-3);
  tc.tangent = true;
  tc.weight_decay = 0.05;
  c.push_back({"tangent_col", tc});
  UpdateRule init = Rule(Base::kAdamW, Sphere::kFrobenius, Gains::kRowCol, 1e-3);
  init.radius_mode = kernels::RadiusMode::kInit;
  c.push_back({"radius_init", init});
  return c;
}

// One rank's config for `shapes` under one rule, every matrix in one bucket.
BackendConfig OneRank(const UpdateRule& rule, const std::vector<Shape>& shapes, Dtype pd, Dtype gd,
                      bool ns_bf16, bool update_norms) {
  BackendConfig c;
  c.ns_bf16 = ns_bf16;
  c.update_norms = update_norms;
  c.check_len = 2 * static_cast<int64_t>(shapes.size());  // sums of squares, then presence
  BucketDesc b;
  int64_t seg = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    ParamDesc p;
    p.name = "p" + std::to_string(i);
    p.experts = shapes[i].experts;
    p.n = shapes[i].n;
    const int64_t pm = shapes[i].m;
    p.param_dtype = pd;
    p.grad_dtype = gd;
    p.rule = rule;
    const bool vector = shapes[i].m == 1 && shapes[i].experts == 1 && i + 1 == shapes.size();
    if (vector) p.rule = Rule(Base::kAdamW, Sphere::kNone, Gains::kNone, 1e-3);  // a 1-D param
    c.params.push_back(p);
    for (int64_t e = 0; e < p.experts; ++e) {
      SlotDesc s;
      s.param = static_cast<int64_t>(i);
      s.m = pm;
      s.tensor_offset = e * pm * p.n;
      s.rows = pm;
      s.holds = true;
      s.muon = p.rule.base == Base::kMuon;
      s.ns_here = s.muon;
      s.accounts = true;
      s.seg_offset = seg;
      if (s.muon) b.x_local = std::max(b.x_local, seg + pm * p.n);
      seg += pm * p.n;
      b.slots.push_back(static_cast<int>(c.slots.size()));
      c.slots.push_back(s);
    }
  }
  b.end_param = static_cast<int64_t>(shapes.size());
  b.seg = seg;  // one rank: no collectives, so no windows
  c.buckets.push_back(b);
  return c;
}

// The rows of param i's matrices (every slot of a param here has the same).
int64_t MOf(const BackendConfig& c, size_t i) {
  for (const SlotDesc& s : c.slots)
    if (s.param == static_cast<int64_t>(i)) return s.m;
  return 1;
}

// The model's tensors on the host and on the GPU.
struct Model {
  std::vector<std::vector<uint8_t>> w, g;  // host bytes
  std::vector<std::unique_ptr<testing::DeviceVec<uint8_t>>> dw, dg;
  std::vector<ParamPointers> host_ptrs, dev_ptrs;
};

void Fill(std::vector<uint8_t>* out, Dtype d, int64_t count, uint64_t seed, double scale) {
  const std::vector<double> v = testing::RandomNormal(static_cast<size_t>(count), seed, scale);
  out->resize(static_cast<size_t>(count) * (d == Dtype::kF32 ? 4 : 2));
  for (int64_t e = 0; e < count; ++e) {
    if (d == Dtype::kF32) {
      reinterpret_cast<float*>(out->data())[e] = static_cast<float>(v[e]);
    } else {
      reinterpret_cast<uint16_t*>(out->data())[e] = kernels::FloatToBf16(static_cast<float>(v[e]));
    }
  }
}

Model MakeModel(const BackendConfig& c, uint64_t seed) {
  Model m;
  for (size_t i = 0; i < c.params.size(); ++i) {
    const ParamDesc& p = c.params[i];
    const int64_t count = p.experts * MOf(c, i) * p.n;
    m.w.emplace_back();
    m.g.emplace_back();
    Fill(&m.w.back(), p.param_dtype, count, seed + 10 * i, 1.0 / std::sqrt(static_cast<double>(p.n)));
    Fill(&m.g.back(), p.grad_dtype, count, seed + 10 * i + 1, 1e-2);
    m.dw.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
    m.dg.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
    m.dw.back()->Upload(m.w.back());
    m.dg.back()->Upload(m.g.back());
  }
  for (size_t i = 0; i < c.params.size(); ++i) {
    m.host_ptrs.push_back({m.w[i].data(), m.g[i].data()});
    m.dev_ptrs.push_back({m.dw[i]->get(), m.dg[i]->get()});
  }
  return m;
}

// New gradients for the next step, the same on both sides.
void NewGrads(const BackendConfig& c, Model* m, uint64_t seed) {
  for (size_t i = 0; i < c.params.size(); ++i) {
    const ParamDesc& p = c.params[i];
    Fill(&m->g[i], p.grad_dtype, p.experts * MOf(c, i) * p.n, seed + 7 * i, 1e-2);
    cudaMemcpy(m->dg[i]->get(), m->g[i].data(), m->g[i].size(), cudaMemcpyHostToDevice);
  }
}

// Every state array of every slot: the GPU's into the CPU backend (identical inputs).
void CopyState(StepBackend* gpu, StepBackend* cpu, size_t slots) {
  for (size_t k = 0; k < slots; ++k) {
    const std::vector<kernels::StateArray> arrays = gpu->State(static_cast<int>(k));
    for (size_t a = 0; a < arrays.size(); ++a) {
      std::vector<float> v(static_cast<size_t>(arrays[a].count));
      ASSERT_TRUE(gpu->ReadState(static_cast<int>(k), a, 0, arrays[a].count, v.data()).ok());
      ASSERT_TRUE(cpu->WriteState(static_cast<int>(k), a, v.data()).ok());
    }
  }
}

// The largest of max |gpu - cpu| / max |cpu| over every state array; the worst array named.
double StateError(StepBackend* gpu, StepBackend* cpu, size_t slots, std::string* worst) {
  double err = 0.0;
  for (size_t k = 0; k < slots; ++k) {
    const std::vector<kernels::StateArray> arrays = cpu->State(static_cast<int>(k));
    for (size_t a = 0; a < arrays.size(); ++a) {
      std::vector<float> g(static_cast<size_t>(arrays[a].count)), c(g.size());
      if (!gpu->ReadState(static_cast<int>(k), a, 0, arrays[a].count, g.data()).ok()) return 1e30;
      if (!cpu->ReadState(static_cast<int>(k), a, 0, arrays[a].count, c.data()).ok()) return 1e30;
      const std::vector<double> cd(c.begin(), c.end());
      const double e = testing::RelMaxError(g, cd);
      if (e > err) {
        err = e;
        *worst = "slot " + std::to_string(k) + " " + arrays[a].name;
      }
    }
  }
  return err;
}

// The model tensors: the GPU's against the CPU's (bf16 params: the rounded copies).
double ModelError(const BackendConfig& c, const Model& m) {
  double err = 0.0;
  for (size_t i = 0; i < c.params.size(); ++i) {
    const std::vector<uint8_t> dev = m.dw[i]->Download();
    const bool f32 = c.params[i].param_dtype == Dtype::kF32;
    const size_t count = dev.size() / (f32 ? 4 : 2);
    std::vector<float> g(count);
    std::vector<double> h(count);
    for (size_t e = 0; e < count; ++e) {
      g[e] = f32 ? reinterpret_cast<const float*>(dev.data())[e]
                 : kernels::Bf16ToFloat(reinterpret_cast<const uint16_t*>(dev.data())[e]);
      h[e] = f32 ? reinterpret_cast<const float*>(m.w[i].data())[e]
                 : kernels::Bf16ToFloat(reinterpret_cast<const uint16_t*>(m.w[i].data())[e]);
    }
    err = std::max(err, testing::RelMaxError(g, h));
  }
  return err;
}

void Metric(const std::string& name, double value, double bound) {
  std::printf("MDOPT_METRIC %s %.3e %.1e\n", name.c_str(), value, bound);
}

struct Param {
  Case c;
  Dtype pd, gd;
};

void PrintTo(const Param& p, std::ostream* os) {
  *os << p.c.name << (p.pd == Dtype::kBf16 ? " bf16 params" : " f32 params")
      << (p.gd == Dtype::kBf16 ? ", bf16 grads" : ", f32 grads");
}

class CudaStages : public ::testing::TestWithParam<Param> {};

TEST_P(CudaStages, EachStageMatchesTheCpuBackend) {
  MDOPT_SKIP_WITHOUT_GPU();
  const Param& prm = GetParam();
  const std::vector<Shape> shapes = {{1, 64, 96}, {1, 96, 64}, {1, 33, 300}, {3, 40, 48}, {1, 1, 257}};
  const BackendConfig cfg = OneRank(prm.c.rule, shapes, prm.pd, prm.gd, /*ns_bf16=*/true, /*update_norms=*/true);
  const size_t S = cfg.slots.size();
  Model model = MakeModel(cfg, 1234);
  auto gpu_or = kernels::MakeBackend({"cuda:0", 0});
  ASSERT_TRUE(gpu_or.ok()) << gpu_or.status();
  auto cpu_or = kernels::MakeBackend({"cpu", 1});
  ASSERT_TRUE(cpu_or.ok()) << cpu_or.status();
  std::unique_ptr<StepBackend> gpu = *std::move(gpu_or), cpu = *std::move(cpu_or);
  gpu->Enter();
  cpu->Enter();
  ASSERT_TRUE(gpu->Setup(cfg, model.dev_ptrs).ok());
  ASSERT_TRUE(cpu->Setup(cfg, model.host_ptrs).ok());
  const std::string tag = std::string(prm.c.name) + (prm.pd == Dtype::kBf16 ? ".bf16p" : ".f32p") +
                          (prm.gd == Dtype::kBf16 ? ".bf16g" : ".f32g");
  std::string worst;

  // Init: norms, radii, the projection.
  kernels::BadSlice bad;
  gpu->InitNorms(0);
  cpu->InitNorms(0);
  ASSERT_TRUE(gpu->InitRadii(0, &bad));
  ASSERT_TRUE(cpu->InitRadii(0, &bad));
  gpu->InitProject(0);
  cpu->InitProject(0);
  double e = StateError(gpu.get(), cpu.get(), S, &worst);
  Metric("stage.init." + tag, e, kStageBound);
  EXPECT_LE(e, kStageBound) << "init: " << worst;

  const SlotRange all{0, 0, cfg.buckets[0].slots.size()};
  const std::vector<kernels::GroupScalars> groups = {{prm.c.rule.lr * 0.9, prm.c.rule.gain_lr * 0.9}};
  for (int step = 0; step < 3; ++step) {
    CopyState(gpu.get(), cpu.get(), S);
    NewGrads(cfg, &model, 99 + step);
    ASSERT_TRUE(gpu->BindParams(0, model.dev_ptrs).ok());
    ASSERT_TRUE(cpu->BindParams(0, model.host_ptrs).ok());
    for (StepBackend* b : {gpu.get(), cpu.get()}) {
      b->BeginStep(groups);
      b->CheckFinite(0);
      b->ApplyCheck();
      b->Prepare(all);
      b->Pass1(all);
    }
    e = StateError(gpu.get(), cpu.get(), S, &worst);
    Metric("stage.pass1." + tag, e, kStageBound);
    EXPECT_LE(e, kStageBound) << "pass 1, step " << step << ": " << worst;
    // X of the Muon slots, then the GPU's O handed to the CPU.
    const kernels::BucketBuffers gb = gpu->Buffers(0), cb = cpu->Buffers(0);
    const size_t xn = static_cast<size_t>(cfg.buckets[0].x_local);
    if (xn > 0) {
      std::vector<float> gx(xn);
      cudaMemcpy(gx.data(), gb.x_local, xn * 4, cudaMemcpyDeviceToHost);
      const std::vector<double> cx(cb.x_local, cb.x_local + xn);
      e = testing::RelMaxError(gx, cx);
      Metric("stage.pass1_x." + tag, e, kStageBound);
      EXPECT_LE(e, kStageBound) << "X after pass 1";
      gpu->NewtonSchulz(all);
      cudaDeviceSynchronize();
      cudaMemcpy(cb.x_local, gb.x_local, xn * 4, cudaMemcpyDeviceToHost);
    }
    for (StepBackend* b : {gpu.get(), cpu.get()}) b->Pass2(all);
    e = StateError(gpu.get(), cpu.get(), S, &worst);
    Metric("stage.pass2." + tag, e, kStageBound);
    EXPECT_LE(e, kStageBound) << "pass 2, step " << step << ": " << worst;
    for (StepBackend* b : {gpu.get(), cpu.get()}) {
      b->Finish(all);
      b->EndStep();
    }
    e = StateError(gpu.get(), cpu.get(), S, &worst);
    Metric("stage.finish." + tag, e, kStageBound);
    EXPECT_LE(e, kStageBound) << "finish, step " << step << ": " << worst;
    e = ModelError(cfg, model);
    // bf16 model copies: one rounding of values within 1e-5 of each other can differ by one
    // bf16 ulp (2^-8 relative).
    const double model_bound = prm.pd == Dtype::kBf16 ? 1.0 / 128 : kStageBound;
    Metric("stage.model." + tag, e, model_bound);
    EXPECT_LE(e, model_bound) << "model tensors, step " << step;
    kernels::StepOutcome go, co;
    ASSERT_TRUE(gpu->ReadOutcome(&go).ok());
    ASSERT_TRUE(cpu->ReadOutcome(&co).ok());
    EXPECT_EQ(go.skipped, co.skipped);
    EXPECT_EQ(go.steps_taken, co.steps_taken);
    EXPECT_NEAR(go.grad_norm, co.grad_norm, 1e-12 * co.grad_norm);
    for (size_t k = 0; k < S; ++k) {
      const kernels::SlotCounters gc = gpu->Counters(static_cast<int>(k));
      const kernels::SlotCounters cc = cpu->Counters(static_cast<int>(k));
      EXPECT_EQ(gc.projected, cc.projected);
      EXPECT_EQ(gc.gains_stepped, cc.gains_stepped);
      EXPECT_NEAR(gc.delta_sq, cc.delta_sq, 1e-4 * cc.delta_sq + 1e-30);
      EXPECT_NEAR(gc.w_sq, cc.w_sq, 1e-5 * cc.w_sq);
    }
  }
  gpu->Leave();
  cpu->Leave();
}

std::vector<Param> AllParams() {
  std::vector<Param> out;
  for (const Case& c : Cases()) {
    out.push_back({c, Dtype::kF32, Dtype::kF32});
    out.push_back({c, Dtype::kBf16, Dtype::kBf16});
  }
  // bf16 weights with f32 gradients (the one mixed pair the ABI takes) on two rules: the
  // dtype paths do not depend on the rule.
  out.push_back({Cases()[0], Dtype::kBf16, Dtype::kF32});
  out.push_back({Cases()[1], Dtype::kBf16, Dtype::kF32});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Rules, CudaStages, ::testing::ValuesIn(AllParams()),
                         [](const ::testing::TestParamInfo<Param>& i) {
                           return std::string(i.param.c.name) + (i.param.pd == Dtype::kBf16 ? "_bf16p" : "_f32p") +
                                  (i.param.gd == Dtype::kBf16 ? "_bf16g" : "_f32g");
                         });

// A NaN in one gradient: the flag is set on the device, every later stage is a no-op, and
// the host learns which param at ReadOutcome.
TEST(CudaStagesSkip, NonFiniteGradientLeavesEverythingAsItWas) {
  MDOPT_SKIP_WITHOUT_GPU();
  const BackendConfig cfg = OneRank(Cases()[0].rule, {{1, 64, 96}, {1, 40, 48}}, Dtype::kF32, Dtype::kF32, true, false);
  Model model = MakeModel(cfg, 7);
  auto gpu_or = kernels::MakeBackend({"cuda:0", 0});
  ASSERT_TRUE(gpu_or.ok()) << gpu_or.status();
  std::unique_ptr<StepBackend> gpu = *std::move(gpu_or);
  gpu->Enter();
  ASSERT_TRUE(gpu->Setup(cfg, model.dev_ptrs).ok());
  kernels::BadSlice bad;
  gpu->InitNorms(0);
  ASSERT_TRUE(gpu->InitRadii(0, &bad));
  gpu->InitProject(0);
  cudaDeviceSynchronize();
  const std::vector<uint8_t> before = model.dw[0]->Download();
  const float nan = std::nanf("");
  cudaMemcpy(model.dg[1]->get() + 4 * 17, &nan, 4, cudaMemcpyHostToDevice);
  const SlotRange all{0, 0, cfg.buckets[0].slots.size()};
  ASSERT_TRUE(gpu->BindParams(0, model.dev_ptrs).ok());
  gpu->BeginStep({{8e-3, 1e-3}});
  gpu->CheckFinite(0);
  gpu->ApplyCheck();
  gpu->Prepare(all);
  gpu->Pass1(all);
  gpu->NewtonSchulz(all);
  gpu->Pass2(all);
  gpu->Finish(all);
  gpu->EndStep();
  kernels::StepOutcome out;
  ASSERT_TRUE(gpu->ReadOutcome(&out).ok());
  EXPECT_TRUE(out.skipped);
  EXPECT_EQ(out.bad_param, 1);
  EXPECT_EQ(out.steps_taken, 0);
  EXPECT_EQ(model.dw[0]->Download(), before);
  gpu->Leave();
}

// A host pointer is refused, naming the param; nothing is bound.
TEST(CudaStagesPointers, HostPointerIsRefusedNamingTheParam) {
  MDOPT_SKIP_WITHOUT_GPU();
  const BackendConfig cfg = OneRank(Cases()[1].rule, {{1, 16, 32}}, Dtype::kF32, Dtype::kF32, true, false);
  Model model = MakeModel(cfg, 3);
  auto gpu_or = kernels::MakeBackend({"cuda:0", 0});
  ASSERT_TRUE(gpu_or.ok());
  std::unique_ptr<StepBackend> gpu = *std::move(gpu_or);
  gpu->Enter();
  const absl::Status s = gpu->Setup(cfg, model.host_ptrs);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'p0'"), std::string::npos) << s;
  ASSERT_TRUE(gpu->Setup(cfg, model.dev_ptrs).ok());
  std::vector<ParamPointers> mixed = {{model.dev_ptrs[0].param, model.host_ptrs[0].grad}};
  const absl::Status b = gpu->BindParams(0, mixed);
  EXPECT_EQ(b.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.message().find("gradient"), std::string::npos) << b;
  gpu->Leave();
}

}  // namespace
}  // namespace mdopt
