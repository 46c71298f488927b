// The whole step through the C ABI: device=cuda:0 against device=cpu at one rank, for every
// preset and every (param, grad) dtype pair the ABI takes (f32/f32, bf16/bf16, bf16/f32), over a model with square, wide, tall and odd
// matrices, an expert stack and a vector; row blocks (blocks=rows:2 and rows:3: their gains
// and directions too, the blocks' shared gains bitwise equal on the device); the state bytes
// per parameter, the same as on the CPU; the step on an NCCL communicator of one rank. Also the ABI's contract for a CUDA
// optimizer: host pointers refused naming the param, and a device the machine lacks refused
// with the runtime's reason.
//
// Bounds, from the arithmetic (weights after kSteps steps, max |gpu - cpu| / max |cpu| per
// tensor):
//   - ns_dtype=f32 on both devices: every stage agrees to ~1e-6 (cuda_backend_test), and
//     Newton-Schulz in float32 on cuBLASLt (no TF32) against OpenBLAS differs by the order
//     of float32 sums, ~1e-6 relative of O, which the step scales by lr (<= 2e-2) into W:
//     2e-5 leaves room for kSteps of compounding;
//   - ns_dtype=bf16 on the GPU against f32 on the CPU: bf16 NS differs from float32 NS by up
//     to ~3e-2 of O (8 significant bits through 5 iterations, measured 5.3% on the CPU's
//     bf16 path at its worst shape), scaled by lr * muon scale (<= 4e-2) into W, per step:
//     5e-3 over kSteps steps;
//   - bf16 params add one bf16 rounding of W (2^-8 relative: 4e-3) wherever the two sides'
//     f32 masters round to different neighbours, so their bound is 1/128.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "abi_model.h"
#include "cuda_test_util.h"
#include "mdopt/mdopt.h"

namespace mdopt {
namespace {

constexpr int kSteps = 4;

using Tensor = testing::AbiTensor;
using testing::AsDouble;
using testing::Values;

const std::vector<Tensor>& Tensors() {
  static const std::vector<Tensor> t = {
      {"square", 2, {128, 128, 0}}, {"wide", 2, {64, 320, 0}}, {"tall", 2, {320, 64, 0}},
      {"odd", 2, {45, 77, 0}},      {"experts", 3, {4, 48, 40}}};
  return t;
}

// blocks=rows:2 and rows:3 (GLU fc1s [gate; up], a fused [q; k; v]): every matrix's rows a
// multiple of 6, so one model serves both; blocks square-ish (fc1), tall (tall) and an
// expert stack's (experts: 3 experts of K blocks each).
const std::vector<Tensor>& BlockTensors() {
  static const std::vector<Tensor> t = {
      {"fc1", 2, {96, 48, 0}}, {"tall", 2, {240, 32, 0}}, {"experts", 3, {3, 60, 24}}};
  return t;
}

struct Trained {
  std::vector<std::vector<uint8_t>> w;  // host copies of the params after the steps
  int64_t params = 0, state_bytes = 0, workspace_bytes = 0;
  int64_t allocations = 0;  // emulation only: CUDA allocations after the first step
  // Where Train was given a model: each matrix's state after the steps, by mdopt_get_state
  // field (gain_row, gain_col, gain_scalar, radius, direction; those its rule has).
  std::vector<std::map<std::string, std::vector<double>>> state;
};


// kSteps steps of `preset` on `device` ("cpu" or "cuda:0"); the params as they end.
// hparams: before the third step, mdopt_set_group_hparam changes beta1 (and momentum where
// the group runs Muon) of the matrices' group and beta2 of the vectors'.
// model: the matrices to train instead of Tensors() (a bias vector is added either way); with
// one, the matrices' gains, radii and directions are read back into out->state.
void Train(const std::string& device, const char* preset, mdopt_dtype pd, mdopt_dtype gd,
           const char* ns_dtype, Trained* out, bool nccl = false, bool hparams = false,
           const std::vector<Tensor>* model = nullptr) {
  mdopt_comm* comm = nullptr;
  if (nccl) {
    char id[MDOPT_NCCL_UNIQUE_ID_BYTES];
    ABI_OK(mdopt_comm_nccl_unique_id(id));
    ABI_OK(mdopt_comm_create_nccl(id, 1, 0, 0, &comm));
  } else {
    ABI_OK(mdopt_comm_create_local(&comm));
  }
  mdopt_optimizer* opt = nullptr;
  const std::string options = "device=" + device + " ns_dtype=" + ns_dtype;
  ABI_OK(mdopt_create(comm, options.c_str(), &opt));
  ABI_OK(mdopt_add_group(opt, "g", (std::string("preset=") + preset).c_str()));
  ABI_OK(mdopt_add_group(opt, "v", "preset=vector"));
  const bool gpu = device != "cpu";
  std::vector<Tensor> tensors = model != nullptr ? *model : Tensors();
  tensors.push_back({"bias", 1, {300, 0, 0}});
  std::vector<std::vector<uint8_t>> w, g;
  std::vector<std::unique_ptr<testing::DeviceVec<uint8_t>>> dw, dg;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    w.push_back(Values(t.numel(), pd, 100 + i, 1.0 / std::sqrt(static_cast<double>(t.shape[t.ndim - 1]))));
    g.push_back(Values(t.numel(), gd, 200 + i, 1e-2));
    dw.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
    dg.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
    if (gpu) {
      dw.back()->Upload(w.back());
      dg.back()->Upload(g.back());
    }
    mdopt_param_desc d = mdopt_param_desc_init();
    d.name = t.name;
    d.group = t.ndim == 1 ? "v" : "g";
    d.ndim = t.ndim;
    for (int k = 0; k < 3; ++k) d.shape[k] = t.shape[k];
    d.param_dtype = pd;
    d.grad_dtype = gd;
    d.param = gpu ? static_cast<void*>(dw.back()->get()) : w.back().data();
    d.grad = gpu ? static_cast<const void*>(dg.back()->get()) : g.back().data();
    ABI_OK(mdopt_add_param(opt, &d, nullptr));
    out->params += t.numel();
  }
  ABI_OK(mdopt_finalize(opt));
  ABI_OK(mdopt_state_bytes(opt, &out->state_bytes));
  ABI_OK(mdopt_workspace_bytes(opt, &out->workspace_bytes));
  cudaStream_t stream = nullptr;
  if (gpu) {
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  }
  for (int s = 0; s < kSteps; ++s) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      // In place: the optimizer holds the buffer's address.
      const std::vector<uint8_t> v = Values(tensors[i].numel(), gd, 1000 * s + i, 1e-2);
      std::memcpy(g[i].data(), v.data(), v.size());
      if (gpu) cudaMemcpy(dg[i]->get(), g[i].data(), g[i].size(), cudaMemcpyHostToDevice);
    }
    if (hparams && s == 2) {
      ABI_OK(mdopt_set_group_hparam(opt, "g", "beta1", 0.7));
      if (std::string(preset).find("muon") != std::string::npos) {
        ABI_OK(mdopt_set_group_hparam(opt, "g", "momentum", 0.8));
      }
      ABI_OK(mdopt_set_group_hparam(opt, "v", "beta2", 0.9));
    }
    mdopt_step_info info = mdopt_step_info_init();
    // The last step asks for its info (a host wait); the others return without one.
    ABI_OK(mdopt_step(opt, 1.0, stream, s + 1 == kSteps ? &info : nullptr));
#ifdef MDOPT_CUDA_EMULATION
    // A step allocates nothing after the first (the emulation counts every CUDA allocation,
    // stream and event).
    if (gpu && s == 0) out->allocations = emu::Allocations();
    if (gpu && s > 0) EXPECT_EQ(emu::Allocations(), out->allocations) << "step " << s;
#endif
    if (s + 1 == kSteps) {
      EXPECT_EQ(info.step, kSteps);
      EXPECT_EQ(info.skipped, 0);
    }
  }
  if (gpu) {
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    cudaStreamDestroy(stream);
    for (size_t i = 0; i < tensors.size(); ++i) w[i] = dw[i]->Download();
  }
  out->w = w;
  if (model != nullptr) {
    for (size_t i = 0; i < model->size(); ++i) {
      out->state.emplace_back();
      for (const char* field : {"gain_row", "gain_col", "gain_scalar", "radius", "direction"}) {
        int64_t n = 0;
        // A field the rule lacks (gain_col under gains=scalar) is refused: left out.
        if (mdopt_get_state(opt, static_cast<int64_t>(i), field, nullptr, 0, &n) != MDOPT_SUCCESS) continue;
        std::vector<double>& v = out->state.back()[field];
        v.resize(static_cast<size_t>(n));
        ABI_OK(mdopt_get_state(opt, static_cast<int64_t>(i), field, v.data(), n, nullptr));
      }
    }
  }
  ABI_OK(mdopt_destroy(opt));
  ABI_OK(mdopt_comm_destroy(comm));
}

struct Param {
  const char* preset;
  mdopt_dtype pd, gd;
  const char* ns_dtype;
};

void PrintTo(const Param& p, std::ostream* os) {
  *os << p.preset << (p.pd == MDOPT_DTYPE_BF16 ? " bf16 params" : " f32 params")
      << (p.gd == MDOPT_DTYPE_BF16 ? ", bf16 grads" : ", f32 grads") << ", ns_dtype=" << p.ns_dtype;
}

class CudaStep : public ::testing::TestWithParam<Param> {};

TEST_P(CudaStep, MatchesDeviceCpu) {
  MDOPT_SKIP_WITHOUT_GPU();
  const Param& p = GetParam();
  Trained gpu, cpu;
  ASSERT_NO_FATAL_FAILURE(Train("cuda:0", p.preset, p.pd, p.gd, p.ns_dtype, &gpu));
  ASSERT_NO_FATAL_FAILURE(Train("cpu", p.preset, p.pd, p.gd, "f32", &cpu));
  const bool bf16_ns = std::string(p.ns_dtype) == "bf16";
  double bound = bf16_ns ? 5e-3 : 2e-5;
  if (p.pd == MDOPT_DTYPE_BF16) bound = std::max(bound, 1.0 / 128);
  double worst = 0.0;
  for (size_t i = 0; i < cpu.w.size(); ++i) {
    const std::vector<double> c = AsDouble(cpu.w[i], p.pd), g = AsDouble(gpu.w[i], p.pd);
    const double e = testing::RelMaxError(g, c);
    worst = std::max(worst, e);
    EXPECT_LE(e, bound) << "tensor " << i;
  }
  // The same state arrays on both devices: the same bytes.
  EXPECT_EQ(gpu.state_bytes, cpu.state_bytes);
  std::printf("MDOPT_METRIC state_bytes_per_param.%s.%s %.3f %.3f\n", p.preset,
              p.pd == MDOPT_DTYPE_BF16 ? "bf16p" : "f32p",
              static_cast<double>(gpu.state_bytes) / static_cast<double>(gpu.params),
              static_cast<double>(cpu.state_bytes) / static_cast<double>(cpu.params));
  std::printf("MDOPT_INFO workspace_bytes.%s %lld\n", p.preset, static_cast<long long>(gpu.workspace_bytes));
  std::printf("MDOPT_METRIC step.%s.%s.%s.ns_%s %.3e %.1e\n", p.preset,
              p.pd == MDOPT_DTYPE_BF16 ? "bf16p" : "f32p", p.gd == MDOPT_DTYPE_BF16 ? "bf16g" : "f32g",
              p.ns_dtype, worst, bound);
}

// Hyperparameters changed between steps (mdopt_set_group_hparam) reach the device's parameter
// table before the next step: the same weights as on the CPU, and not those of an unchanged run.
TEST(CudaStepHparams, ChangedBetweenStepsMatchesDeviceCpu) {
  MDOPT_SKIP_WITHOUT_GPU();
  for (const char* preset : {"md-muon", "adamw"}) {
    Trained gpu, cpu, unchanged;
    ASSERT_NO_FATAL_FAILURE(Train("cuda:0", preset, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32", &gpu,
                                  false, true));
    ASSERT_NO_FATAL_FAILURE(Train("cpu", preset, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32", &cpu,
                                  false, true));
    ASSERT_NO_FATAL_FAILURE(Train("cuda:0", preset, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32",
                                  &unchanged));
    double differs = 0.0;
    for (size_t i = 0; i < cpu.w.size(); ++i) {
      const std::vector<double> c = AsDouble(cpu.w[i], MDOPT_DTYPE_F32);
      EXPECT_LE(testing::RelMaxError(AsDouble(gpu.w[i], MDOPT_DTYPE_F32), c), 2e-5)
          << preset << " tensor " << i;
      differs = std::max(differs, testing::RelMaxError(AsDouble(unchanged.w[i], MDOPT_DTYPE_F32), c));
    }
    EXPECT_GT(differs, 1e-4) << preset << ": the changed values made no difference";
  }
}

std::vector<Param> AllParams() {
  std::vector<Param> out;
  const char* presets[] = {"md-muon", "md-adamw", "muon", "adamw", "muonh", "router", "adamh", "embedding"};
  for (const char* preset : presets) {
    out.push_back({preset, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32"});
    out.push_back({preset, MDOPT_DTYPE_BF16, MDOPT_DTYPE_BF16, "f32"});
    out.push_back({preset, MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32, "f32"});
  }
  for (const char* preset : {"md-muon", "muon", "router"}) out.push_back({preset, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "bf16"});
  // The quintic set cycled past five iterations (ns_coeffs=quintic), and held
  // (ns_coeffs=quintic_hold), against the CPU backend's schedule.
  out.push_back({"md-muon ns_steps=15", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32"});
  out.push_back({"md-muon ns_coeffs=quintic_hold ns_steps=7", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32"});
  // preserve_init (the gains absorb the initial norms on the device; frobenius and
  // radius=fan_in: cuda_sharded_test).
  out.push_back({"router preserve_init=1", MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32, "f32"});
  out.push_back({"md-adamw sphere=col gains=col preserve_init=1", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, "f32"});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaStep, ::testing::ValuesIn(AllParams()),
                         [](const ::testing::TestParamInfo<Param>& i) {
                           std::string name = i.param.preset;
                           std::replace_if(name.begin(), name.end(),
                                           [](char c) { return !std::isalnum(static_cast<unsigned char>(c)); }, '_');
                           return name + (i.param.pd == MDOPT_DTYPE_BF16 ? "_bf16p" : "_f32p") +
                                  (i.param.gd == MDOPT_DTYPE_BF16 ? "_bf16g" : "_f32g") + "_ns_" +
                                  i.param.ns_dtype;
                         });

// blocks=rows:K at one rank (cuda_sharded_test has 2 and 3 ranks): on the device each block
// slot has its own sphere, radius and Newton-Schulz (or Adam moments), the row gains are per
// row, and the column and scalar gains are shared by a matrix's K blocks (every block slot's
// replica stepped with the one gradient summed over the K blocks). md-muon and md-adamw keep
// row and column gains, so the shared column gains are exercised; one case has the shared
// scalar gain instead. Held, after kSteps steps, to device=cpu (ns_dtype=f32 on both):
//   - the weights with CudaStep's bounds (2e-5; 1/128 with bf16 params, one bf16 rounding);
//   - the f32 state the weights are made of, directions and effective gains, to 2e-5 for
//     every dtype (the masters stay float32 under bf16 params, so no bf16 rounding enters);
//   - on the device, the shared gains' replicas bitwise equal over a matrix's K blocks (a
//     replica stepped with a different sum drifts by float32 rounding and would show here
//     first), and every block's bare direction on its own radius sqrt(max(m/K, n)) to 1e-5
//     (blocks_test's bound for float32 state): a block sharing its matrix's sphere would not be.
struct BlockParam {
  const char* name;
  const char* spec;  // the preset and the group's keys
  int64_t blocks;
  mdopt_dtype pd, gd;
};

void PrintTo(const BlockParam& p, std::ostream* os) {
  *os << p.spec << (p.pd == MDOPT_DTYPE_BF16 ? ", bf16 params" : ", f32 params")
      << (p.gd == MDOPT_DTYPE_BF16 ? ", bf16 grads" : ", f32 grads");
}

class CudaStepBlocks : public ::testing::TestWithParam<BlockParam> {};

TEST_P(CudaStepBlocks, MatchesDeviceCpu) {
  MDOPT_SKIP_WITHOUT_GPU();
  const BlockParam& p = GetParam();
  const std::vector<Tensor>& model = BlockTensors();
  Trained gpu, cpu;
  ASSERT_NO_FATAL_FAILURE(Train("cuda:0", p.spec, p.pd, p.gd, "f32", &gpu, false, false, &model));
  ASSERT_NO_FATAL_FAILURE(Train("cpu", p.spec, p.pd, p.gd, "f32", &cpu, false, false, &model));
  ASSERT_EQ(gpu.state.size(), model.size());
  ASSERT_EQ(cpu.state.size(), model.size());
  const double bound = p.pd == MDOPT_DTYPE_BF16 ? 1.0 / 128 : 2e-5, state_bound = 2e-5;
  double worst_w = 0.0, worst_state = 0.0, worst_norm = 0.0;
  for (size_t i = 0; i < cpu.w.size(); ++i) {
    const double e = testing::RelMaxError(AsDouble(gpu.w[i], p.pd), AsDouble(cpu.w[i], p.pd));
    worst_w = std::max(worst_w, e);
    EXPECT_LE(e, bound) << "tensor " << i;
  }
  const bool col = std::strstr(p.spec, "gains=scalar") == nullptr;
  for (size_t i = 0; i < model.size(); ++i) {
    const Tensor& t = model[i];
    const std::map<std::string, std::vector<double>>& gs = gpu.state[i];
    const std::map<std::string, std::vector<double>>& cs = cpu.state[i];
    SCOPED_TRACE(t.name);
    // The fields the rule has, on both devices.
    std::vector<std::string> fields = {"direction", "radius"};
    if (col) {
      fields.insert(fields.end(), {"gain_row", "gain_col"});
    } else {
      fields.push_back("gain_scalar");
    }
    for (const std::string& f : fields) {
      ASSERT_TRUE(gs.count(f) && cs.count(f)) << f;
      ASSERT_EQ(gs.at(f).size(), cs.at(f).size()) << f;
      const double e = testing::RelMaxError(gs.at(f), cs.at(f));
      worst_state = std::max(worst_state, e);
      EXPECT_LE(e, state_bound) << f;
    }
    const int64_t E = t.ndim == 3 ? t.shape[0] : 1, K = p.blocks;
    const int64_t m = t.shape[t.ndim - 2] / K, n = t.shape[t.ndim - 1], slots = E * K;
    // The shared gains: each block slot's replica bitwise its matrix's block 0's.
    int64_t mismatches = 0;
    if (col) {
      const std::vector<double>& gc = gs.at("gain_col");
      ASSERT_EQ(static_cast<int64_t>(gc.size()), slots * n);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 1; k < K; ++k)
          for (int64_t j = 0; j < n; ++j) mismatches += gc[(e * K + k) * n + j] != gc[e * K * n + j];
      // Row gains are per row, not shared: block 1's are not a copy of block 0's.
      const std::vector<double>& gr = gs.at("gain_row");
      EXPECT_NE(std::vector<double>(gr.begin(), gr.begin() + m),
                std::vector<double>(gr.begin() + m, gr.begin() + 2 * m));
    } else {
      const std::vector<double>& sc = gs.at("gain_scalar");
      ASSERT_EQ(static_cast<int64_t>(sc.size()), slots);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 1; k < K; ++k) mismatches += sc[e * K + k] != sc[e * K];
    }
    EXPECT_EQ(mismatches, 0) << "shared gains differ between blocks on the device";
    // Every block on its own sphere.
    const std::vector<double>& dir = gs.at("direction");
    const std::vector<double>& radius = gs.at("radius");
    ASSERT_EQ(static_cast<int64_t>(dir.size()), t.numel());
    ASSERT_EQ(static_cast<int64_t>(radius.size()), slots);
    const double want = std::sqrt(static_cast<double>(std::max(m, n)));
    for (int64_t s = 0; s < slots; ++s) {
      double sq = 0.0;
      for (int64_t q = s * m * n; q < (s + 1) * m * n; ++q) sq += dir[q] * dir[q];
      EXPECT_NEAR(radius[s], want, 1e-6 * want) << "block slot " << s;
      const double rel = std::abs(std::sqrt(sq) - radius[s]) / radius[s];
      worst_norm = std::max(worst_norm, rel);
      EXPECT_LE(rel, 1e-5) << "block slot " << s;
    }
  }
  std::printf("MDOPT_METRIC step_blocks.%s %.3e %.1e\n", p.name, worst_w, bound);
  std::printf("MDOPT_METRIC step_blocks_state.%s %.3e %.1e\n", p.name, worst_state, state_bound);
  std::printf("MDOPT_METRIC step_blocks_norm.%s %.3e %.1e\n", p.name, worst_norm, 1e-5);
}

const BlockParam kBlockParams[] = {
    {"md_muon_rows2_f32p_f32g", "md-muon blocks=rows:2", 2, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"md_muon_rows2_bf16p_bf16g", "md-muon blocks=rows:2", 2, MDOPT_DTYPE_BF16, MDOPT_DTYPE_BF16},
    {"md_adamw_rows2_f32p_f32g", "md-adamw blocks=rows:2", 2, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"md_adamw_rows2_bf16p_f32g", "md-adamw blocks=rows:2", 2, MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32},
    {"md_muon_rows3_f32p_f32g", "md-muon blocks=rows:3", 3, MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    // The shared scalar gain (no column gains), with the tangent projection per block.
    {"md_adamw_rows3_scalar_tangent_bf16p_bf16g", "md-adamw blocks=rows:3 gains=scalar tangent=1", 3,
     MDOPT_DTYPE_BF16, MDOPT_DTYPE_BF16},
};

INSTANTIATE_TEST_SUITE_P(Blocks, CudaStepBlocks, ::testing::ValuesIn(kBlockParams),
                         [](const ::testing::TestParamInfo<BlockParam>& i) { return std::string(i.param.name); });

// Interleaved blocks (blocks=groups:G:h0,h1,...): a fused weight whose rows are G groups of
// K pieces, block j piece j of every group (GQA linear_qkv: per query group its Q heads, K,
// V), and blocks of unequal height one after another (groups:1, MLA kv_down). On the device
// the master copy is in block order for f32 params too, and every read and write of the
// model's weight and gradient goes through the row map. Held, after kSteps steps, to
// device=cpu as CudaStepBlocks (weights 2e-5, 1/128 with bf16 params; the f32 state 2e-5),
// and every block's bare direction, gathered from the tensor's rows of its pieces
// (mdopt_get_state gives them in the tensor's order), on its own radius sqrt(max(G hj, n)) to
// 1e-5: rows read through a wrong map would leave the blocks off their spheres. The model:
// one matrix, a wider one (two column tiles) and a stack of two experts.
struct InterleavedParam {
  const char* name;
  const char* spec;
  int64_t groups;
  std::vector<int64_t> heights;
  mdopt_dtype pd, gd;
};

void PrintTo(const InterleavedParam& p, std::ostream* os) {
  *os << p.spec << (p.pd == MDOPT_DTYPE_BF16 ? ", bf16 params" : ", f32 params")
      << (p.gd == MDOPT_DTYPE_BF16 ? ", bf16 grads" : ", f32 grads");
}

class CudaStepInterleaved : public ::testing::TestWithParam<InterleavedParam> {};

TEST_P(CudaStepInterleaved, MatchesDeviceCpu) {
  MDOPT_SKIP_WITHOUT_GPU();
  const InterleavedParam& p = GetParam();
  const int64_t G = p.groups, K = static_cast<int64_t>(p.heights.size());
  int64_t H = 0;
  std::vector<int64_t> start;
  for (int64_t h : p.heights) {
    start.push_back(H);
    H += h;
  }
  const int64_t M = G * H;
  const std::vector<Tensor> model = {
      {"qkv", 2, {M, 16, 0}}, {"qkv_wide", 2, {M, 300, 0}}, {"experts", 3, {2, M, 24}}};
  Trained gpu, cpu;
  ASSERT_NO_FATAL_FAILURE(Train("cuda:0", p.spec, p.pd, p.gd, "f32", &gpu, false, false, &model));
  ASSERT_NO_FATAL_FAILURE(Train("cpu", p.spec, p.pd, p.gd, "f32", &cpu, false, false, &model));
  ASSERT_EQ(gpu.state.size(), model.size());
  ASSERT_EQ(cpu.state.size(), model.size());
  const double bound = p.pd == MDOPT_DTYPE_BF16 ? 1.0 / 128 : 2e-5, state_bound = 2e-5;
  double worst_w = 0.0, worst_state = 0.0, worst_norm = 0.0;
  for (size_t i = 0; i < cpu.w.size(); ++i) {
    const double e = testing::RelMaxError(AsDouble(gpu.w[i], p.pd), AsDouble(cpu.w[i], p.pd));
    worst_w = std::max(worst_w, e);
    EXPECT_LE(e, bound) << "tensor " << i;
  }
  for (size_t i = 0; i < model.size(); ++i) {
    const Tensor& t = model[i];
    const std::map<std::string, std::vector<double>>& gs = gpu.state[i];
    const std::map<std::string, std::vector<double>>& cs = cpu.state[i];
    SCOPED_TRACE(t.name);
    for (const std::string f : {"direction", "radius", "gain_row", "gain_col"}) {
      ASSERT_TRUE(gs.count(f) && cs.count(f)) << f;
      ASSERT_EQ(gs.at(f).size(), cs.at(f).size()) << f;
      const double e = testing::RelMaxError(gs.at(f), cs.at(f));
      worst_state = std::max(worst_state, e);
      EXPECT_LE(e, state_bound) << f;
    }
    const int64_t E = t.ndim == 3 ? t.shape[0] : 1, n = t.shape[t.ndim - 1];
    const std::vector<double>& dir = gs.at("direction");
    const std::vector<double>& radius = gs.at("radius");
    ASSERT_EQ(static_cast<int64_t>(dir.size()), t.numel());
    ASSERT_EQ(static_cast<int64_t>(radius.size()), E * K);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t s = e * K + j, hj = p.heights[static_cast<size_t>(j)];
        double sq = 0.0;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r = 0; r < hj; ++r) {
            const int64_t row = e * M + g * H + start[static_cast<size_t>(j)] + r;
            for (int64_t c = 0; c < n; ++c) sq += dir[row * n + c] * dir[row * n + c];
          }
        const double want = std::sqrt(static_cast<double>(std::max(G * hj, n)));
        EXPECT_NEAR(radius[s], want, 1e-6 * want) << "block slot " << s;
        const double rel = std::abs(std::sqrt(sq) - radius[s]) / radius[s];
        worst_norm = std::max(worst_norm, rel);
        EXPECT_LE(rel, 1e-5) << "block slot " << s;
      }
    }
  }
  testing::PrintMetric(std::string("step_interleaved.") + p.name, worst_w, bound);
  testing::PrintMetric(std::string("step_interleaved_state.") + p.name, worst_state, state_bound);
  testing::PrintMetric(std::string("step_interleaved_norm.") + p.name, worst_norm, 1e-5);
}

const InterleavedParam kInterleavedParams[] = {
    {"md_muon_gqa_f32p_f32g", "md-muon blocks=groups:3:4,2,2", 3, {4, 2, 2}, MDOPT_DTYPE_F32,
     MDOPT_DTYPE_F32},
    {"md_muon_gqa_bf16p_bf16g", "md-muon blocks=groups:3:4,2,2", 3, {4, 2, 2}, MDOPT_DTYPE_BF16,
     MDOPT_DTYPE_BF16},
    {"md_adamw_gqa_f32p_f32g", "md-adamw blocks=groups:3:4,2,2", 3, {4, 2, 2}, MDOPT_DTYPE_F32,
     MDOPT_DTYPE_F32},
    {"md_adamw_gqa_bf16p_f32g", "md-adamw blocks=groups:3:4,2,2", 3, {4, 2, 2}, MDOPT_DTYPE_BF16,
     MDOPT_DTYPE_F32},
    // Unequal blocks one after another (G = 1: the identity map).
    {"md_muon_unequal_f32p_f32g", "md-muon blocks=groups:1:5,3", 1, {5, 3}, MDOPT_DTYPE_F32,
     MDOPT_DTYPE_F32},
    {"md_adamw_unequal_bf16p_bf16g", "md-adamw blocks=groups:1:5,3", 1, {5, 3}, MDOPT_DTYPE_BF16,
     MDOPT_DTYPE_BF16},
};

INSTANTIATE_TEST_SUITE_P(Interleaved, CudaStepInterleaved, ::testing::ValuesIn(kInterleavedParams),
                         [](const ::testing::TestParamInfo<InterleavedParam>& i) {
                           return std::string(i.param.name);
                         });

// The same step on an NCCL communicator of one rank: the same bits as on the local one.
TEST(CudaStepNccl, OneRankMatchesLocal) {
  MDOPT_SKIP_WITHOUT_GPU();
#ifdef MDOPT_CUDA_EMULATION
  GTEST_SKIP() << "NCCL needs a GPU (this build emulates the CUDA runtime on the CPU)";
#endif
  char id[MDOPT_NCCL_UNIQUE_ID_BYTES];
  if (mdopt_comm_nccl_unique_id(id) == MDOPT_UNSUPPORTED) GTEST_SKIP() << mdopt_last_error();
  Trained local, nccl;
  ASSERT_NO_FATAL_FAILURE(Train("cuda:0", "md-muon", MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32, "bf16", &local));
  ASSERT_NO_FATAL_FAILURE(Train("cuda:0", "md-muon", MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32, "bf16", &nccl, true));
  EXPECT_EQ(local.w, nccl.w);
}

// A checkpoint of a CUDA optimizer: 2 steps, save, a fresh optimizer loads it and takes 2
// more; bit for bit the weights of 4 uninterrupted steps (the state goes through host
// staging and back; bf16 params rebuild their model copies from the loaded masters).
TEST(CudaStepCheckpoint, SaveLoadContinuesBitForBit) {
  MDOPT_SKIP_WITHOUT_GPU();
  for (const mdopt_dtype pd : {MDOPT_DTYPE_F32, MDOPT_DTYPE_BF16}) {
    SCOPED_TRACE(pd == MDOPT_DTYPE_F32 ? "f32 params" : "bf16 params");
    char dir[] = "/tmp/mdopt_cuda_ckpt_XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    std::vector<std::vector<uint8_t>> straight, resumed;
    auto run = [&](int steps, const char* save, const char* load, std::vector<std::vector<uint8_t>>* out) {
      mdopt_comm* comm = nullptr;
      ABI_OK(mdopt_comm_create_local(&comm));
      mdopt_optimizer* opt = nullptr;
      ABI_OK(mdopt_create(comm, "device=cuda:0", &opt));
      ABI_OK(mdopt_add_group(opt, "g", "preset=md-muon"));
      std::vector<std::unique_ptr<testing::DeviceVec<uint8_t>>> dw, dg;
      const std::vector<Tensor>& tensors = Tensors();
      for (size_t i = 0; i < tensors.size(); ++i) {
        const Tensor& t = tensors[i];
        dw.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
        dg.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
        dw.back()->Upload(Values(t.numel(), pd, 100 + i, 0.05));
        dg.back()->Upload(Values(t.numel(), MDOPT_DTYPE_F32, 7, 1e-2));
        mdopt_param_desc d = mdopt_param_desc_init();
        d.name = t.name;
        d.group = "g";
        d.ndim = t.ndim;
        for (int k = 0; k < 3; ++k) d.shape[k] = t.shape[k];
        d.param_dtype = pd;
        d.grad_dtype = MDOPT_DTYPE_F32;
        d.param = dw.back()->get();
        d.grad = dg.back()->get();
        ABI_OK(mdopt_add_param(opt, &d, nullptr));
      }
      ABI_OK(mdopt_finalize(opt));
      const int first = load != nullptr ? 2 : 0;
      if (load != nullptr) {
        ABI_OK(mdopt_load(opt, load));
      }
      for (int s = first; s < first + steps; ++s) {
        for (size_t i = 0; i < tensors.size(); ++i) {
          // In place: the optimizer holds the buffer's address.
          const std::vector<uint8_t> v = Values(tensors[i].numel(), MDOPT_DTYPE_F32, 1000 * s + i, 1e-2);
          cudaMemcpy(dg[i]->get(), v.data(), v.size(), cudaMemcpyHostToDevice);
        }
        ABI_OK(mdopt_step(opt, 1.0, nullptr, nullptr));
        if (save != nullptr && s == 1) {
          ABI_OK(mdopt_save(opt, save));
        }
      }
      cudaDeviceSynchronize();
      for (auto& w : dw) out->push_back(w->Download());
      ABI_OK(mdopt_destroy(opt));
      ABI_OK(mdopt_comm_destroy(comm));
    };
    ASSERT_NO_FATAL_FAILURE(run(4, dir, nullptr, &straight));
    ASSERT_NO_FATAL_FAILURE(run(2, nullptr, dir, &resumed));
    ASSERT_EQ(straight.size(), resumed.size());
    for (size_t i = 0; i < straight.size(); ++i) {
      const std::vector<double> a = AsDouble(resumed[i], pd), b = AsDouble(straight[i], pd);
      EXPECT_EQ(resumed[i], straight[i]) << "tensor " << i << ": " << testing::RelMaxError(a, b);
    }
  }
}

// Out of device memory at finalize is MDOPT_OUT_OF_MEMORY with the bytes needed, and the
// optimizer is left as it was (a smaller model can be finalized by a fresh one): a 400,000 x
// 100,000 adamw matrix needs 320 GB of moments, more than any GPU has. Its tensors are
// tiny buffers: nothing reads them before the arena is allocated.
TEST(CudaStepAbi, OutOfDeviceMemoryIsAStatus) {
  MDOPT_SKIP_WITHOUT_GPU();
  mdopt_comm* comm = nullptr;
  ABI_OK(mdopt_comm_create_local(&comm));
  mdopt_optimizer* opt = nullptr;
  ABI_OK(mdopt_create(comm, "device=cuda:0", &opt));
  ABI_OK(mdopt_add_group(opt, "g", "preset=adamw"));
  testing::DeviceVec<float> w(16), g(16);
  const mdopt_param_desc d = testing::MatrixDesc("huge", "g", 400000, 100000, w.get(), g.get());
  ABI_OK(mdopt_add_param(opt, &d, nullptr));
  EXPECT_EQ(mdopt_finalize(opt), MDOPT_OUT_OF_MEMORY);
  const std::string message = mdopt_last_error();
  EXPECT_NE(message.find("out of memory on cuda:0"), std::string::npos) << message;
  EXPECT_NE(message.find("bytes"), std::string::npos) << message;
  mdopt_step_info info = mdopt_step_info_init();
  EXPECT_EQ(mdopt_step(opt, 1.0, nullptr, &info), MDOPT_INVALID_STATE);  // still not finalized
  ABI_OK(mdopt_destroy(opt));
  ABI_OK(mdopt_comm_destroy(comm));
}

// The ABI's checks on a CUDA optimizer.
TEST(CudaStepAbi, HostPointersStreamsAndState) {
  MDOPT_SKIP_WITHOUT_GPU();
  mdopt_comm* comm = nullptr;
  ABI_OK(mdopt_comm_create_local(&comm));
  mdopt_optimizer* opt = nullptr;
  ABI_OK(mdopt_create(comm, "device=cuda:0", &opt));
  ABI_OK(mdopt_add_group(opt, "g", "preset=md-adamw"));
  std::vector<uint8_t> host_w = Values(32 * 48, MDOPT_DTYPE_F32, 1, 0.1), host_g(host_w.size(), 0);
  testing::DeviceVec<uint8_t> dw, dg;
  dw.Upload(host_w);
  dg.Upload(host_g);
  // host memory: refused at finalize, naming the param
  const mdopt_param_desc d = testing::MatrixDesc("w0", "g", 32, 48, host_w.data(), dg.get());
  ABI_OK(mdopt_add_param(opt, &d, nullptr));
  EXPECT_EQ(mdopt_finalize(opt), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("'w0'"), std::string::npos) << mdopt_last_error();
  ABI_OK(mdopt_set_pointers(opt, 0, dw.get(), dg.get()));
  ABI_OK(mdopt_finalize(opt));
  // A host gradient after finalize: the step is refused and nothing changes.
  const std::vector<uint8_t> before = dw.Download();
  ABI_OK(mdopt_set_pointers(opt, 0, dw.get(), host_g.data()));
  EXPECT_EQ(mdopt_step(opt, 1.0, nullptr, nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("gradient"), std::string::npos) << mdopt_last_error();
  EXPECT_EQ(dw.Download(), before);
  ABI_OK(mdopt_set_pointers(opt, 0, dw.get(), dg.get()));
  mdopt_step_info info = mdopt_step_info_init();
  ABI_OK(mdopt_step(opt, 1.0, nullptr, &info));
  EXPECT_EQ(info.step, 1);
  int64_t bytes = 0;
  ABI_OK(mdopt_state_bytes(opt, &bytes));
  EXPECT_GT(bytes, 0);
  ABI_OK(mdopt_destroy(opt));
  ABI_OK(mdopt_comm_destroy(comm));
}

// A device this machine does not have is refused at finalize with the runtime's reason,
// never a crash: without a GPU device=cuda:0 (this case runs in CI), with one a device
// ordinal past the last.
TEST(CudaStepAbi, AMissingDeviceIsRefusedWithItsReason) {
  std::string why;
  const bool gpu = kernels::cuda::DevicePresent(&why);
  const char* options = gpu ? "device=cuda:1023" : "device=cuda:0";
  mdopt_comm* comm = nullptr;
  ABI_OK(mdopt_comm_create_local(&comm));
  mdopt_optimizer* opt = nullptr;
  ABI_OK(mdopt_create(comm, options, &opt));
  ABI_OK(mdopt_add_group(opt, "g", "preset=md-adamw"));
  std::vector<float> w(64, 0.1f), g(64, 0.0f);
  const mdopt_param_desc d = testing::MatrixDesc("w0", "g", 8, 8, w.data(), g.data());
  ABI_OK(mdopt_add_param(opt, &d, nullptr));
  EXPECT_EQ(mdopt_finalize(opt), MDOPT_UNSUPPORTED);
  const std::string message = mdopt_last_error();
  EXPECT_NE(message.find(gpu ? "cuda:1023" : "cuda:0"), std::string::npos) << message;
  EXPECT_NE(message.find(gpu ? "device(s)" : "no usable CUDA device"), std::string::npos) << message;
  EXPECT_EQ(w[0], 0.1f);
  ABI_OK(mdopt_destroy(opt));
  ABI_OK(mdopt_comm_destroy(comm));
}

}  // namespace
}  // namespace mdopt
