// The sharded step with the CUDA backend: N MPI ranks, each with device=cuda:0, against the
// same N ranks with device=cpu, through the C ABI, on a model whose shapes divide unevenly
// over 2 and 3 ranks (odd rows, fewer rows than ranks, a 3-D stack, a vector). Covers what
// only several ranks reach: the gradient pack and reduce-scatter, the Newton-Schulz gather
// and scatter (f32 and bf16 on the wire), the cross-row records, the weight all-gather and
// its unpack, equal-count padding, grads=reduced and gather=deferred. Collectives of the
// device buffers go through the host-staged adapter (the MPI communicator takes host memory).
//
// Built against the CUDA emulation (emu/README.md) as cuda_sharded_emu_test, under mpirun at
// 2 and 3 ranks, where it also checks that a step allocates nothing after the first. Bound: as cuda_step_test's with ns_dtype=f32 on both sides (2e-5; one
// bf16 rounding, 1/128, for bf16 params); the emulation's Newton-Schulz is float64.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "abi_model.h"
#include "cuda_test_util.h"
#include "mdopt/mdopt.h"

namespace mdopt {
namespace {

constexpr int kSteps = 3;

using Tensor = testing::AbiTensor;
using testing::AsDouble;
using testing::Values;

// The model of a config by its group keys.
const std::vector<Tensor>& Tensors(const char* spec) {
  static const std::vector<Tensor> t = {{"wide", 2, {37, 300, 0}},  {"tall", 2, {131, 48, 0}},
                                        {"tiny", 2, {2, 64, 0}},    {"experts", 3, {3, 40, 24}},
                                        {"square", 2, {64, 64, 0}}, {"bias", 1, {77, 0, 0}}};
  // blocks=rows:2 (GLU fc1s [gate; up]): matrices of even rows, a stack of them.
  static const std::vector<Tensor> g = {{"fc1", 2, {96, 48, 0}},     {"tall", 2, {130, 48, 0}},
                                        {"tiny", 2, {2, 64, 0}},     {"experts", 3, {3, 40, 24}},
                                        {"square", 2, {64, 64, 0}},  {"bias", 1, {77, 0, 0}}};
  // blocks=groups:3:4,2,2 (GQA linear_qkv: per query group 4 Q rows, 2 K, 2 V): every
  // matrix 24 rows, its blocks interleaved; wide, narrow, square and a stack.
  static const std::vector<Tensor> q = {{"qkv_wide", 2, {24, 300, 0}},  {"qkv", 2, {24, 48, 0}},
                                        {"qkv_narrow", 2, {24, 16, 0}}, {"experts", 3, {3, 24, 40}},
                                        {"qkv_square", 2, {24, 24, 0}}, {"bias", 1, {77, 0, 0}}};
  if (std::strstr(spec, "blocks=groups:") != nullptr) return q;
  return std::strstr(spec, "blocks=") != nullptr ? g : t;
}


struct Config {
  const char* name;
  const char* preset;
  const char* spec;     // more group keys
  const char* options;  // more optimizer options
  mdopt_dtype pd, gd;
  // At the second step "tall" has no gradient (NULL) on any rank, and with grads=local
  // "square" none on rank 0 (the others' mean with its zeros): "tall" must not change, and
  // its later steps are bias-corrected with its own count, one less. With
  // grads=reduced, before the third step rank 0 alone drops "tiny"'s: refused everywhere.
  bool skip = false;
};

// kSteps steps at this rank; the params as they end on this rank.
void Train(const Config& c, bool gpu, std::vector<std::vector<uint8_t>>* out) {
  mdopt_comm* comm = nullptr;
  ABI_OK(mdopt_comm_create_mpi(nullptr, &comm));
  int rank = 0;
  ABI_OK(mdopt_comm_rank(comm, &rank));
  mdopt_optimizer* opt = nullptr;
  const std::string options = std::string(gpu ? "device=cuda:0" : "device=cpu threads=1") +
                              " ns_dtype=f32 bucket_mb=0.05 " + c.options;
  ABI_OK(mdopt_create(comm, options.c_str(), &opt));
  ABI_OK(mdopt_add_group(opt, "g", (std::string("preset=") + c.preset + " " + c.spec).c_str()));
  ABI_OK(mdopt_add_group(opt, "v", "preset=vector"));
  std::vector<std::vector<uint8_t>> w, g;
  std::vector<std::unique_ptr<testing::DeviceVec<uint8_t>>> dw, dg;
  const std::vector<Tensor>& tensors = Tensors(c.spec);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    // The same weights on every rank; gradients differ by rank (their mean is the step's).
    w.push_back(Values(t.numel(), c.pd, 100 + i, 1.0 / std::sqrt(static_cast<double>(t.shape[t.ndim - 1]))));
    g.push_back(Values(t.numel(), c.gd, 200 + i + 17 * rank, 1e-2));
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
    d.param_dtype = c.pd;
    d.grad_dtype = c.gd;
    d.param = gpu ? static_cast<void*>(dw.back()->get()) : w.back().data();
    d.grad = gpu ? static_cast<const void*>(dg.back()->get()) : g.back().data();
    ABI_OK(mdopt_add_param(opt, &d, nullptr));
  }
  ABI_OK(mdopt_finalize(opt));
#ifdef MDOPT_CUDA_EMULATION
  int64_t allocations = 0;  // the emulation counts every CUDA allocation, stream and event
#endif
  for (int s = 0; s < kSteps; ++s) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const std::vector<uint8_t> v = Values(tensors[i].numel(), c.gd, 1000 * s + i + 31 * rank, 1e-2);
      std::memcpy(g[i].data(), v.data(), v.size());
      if (gpu) cudaMemcpy(dg[i]->get(), v.data(), v.size(), cudaMemcpyHostToDevice);
    }
    const bool skipping = c.skip && s == 1;
    const bool reduced = std::strstr(c.options, "grads=reduced") != nullptr;
    auto grad_of = [&](size_t i) {
      return gpu ? static_cast<const void*>(dg[i]->get()) : g[i].data();
    };
    auto param_of = [&](size_t i) { return gpu ? static_cast<void*>(dw[i]->get()) : w[i].data(); };
    std::vector<uint8_t> tall_before;
    if (skipping) {
      ABI_OK(mdopt_set_pointers(opt, 1, param_of(1), nullptr));
      if (!reduced && rank == 0) ABI_OK(mdopt_set_pointers(opt, 4, param_of(4), nullptr));
      if (gpu) cudaDeviceSynchronize();
      tall_before = gpu ? dw[1]->Download() : w[1];
    }
    if (c.skip && reduced && s == 2) {
      // grads=reduced, the ranks disagree on "tiny" (rank 0 has no gradient): the step fails
      // on every rank naming it and changes nothing.
      int size = 1;
      ABI_OK(mdopt_comm_size(comm, &size));
      if (size > 1) {
        if (rank == 0) ABI_OK(mdopt_set_pointers(opt, 2, param_of(2), nullptr));
        std::vector<std::vector<uint8_t>> was;
        if (gpu) cudaDeviceSynchronize();
        for (size_t i = 0; i < tensors.size(); ++i) was.push_back(gpu ? dw[i]->Download() : w[i]);
        EXPECT_EQ(mdopt_step(opt, 1.0, nullptr, nullptr), MDOPT_INVALID_ARGUMENT);
        EXPECT_NE(std::strstr(mdopt_last_error(), "'tiny'"), nullptr) << mdopt_last_error();
        if (gpu) cudaDeviceSynchronize();
        for (size_t i = 0; i < tensors.size(); ++i)
          EXPECT_TRUE((gpu ? dw[i]->Download() : w[i]) == was[i]) << "a refused step changed " << tensors[i].name;
        ABI_OK(mdopt_set_pointers(opt, 2, param_of(2), grad_of(2)));
      }
    }
    // Half the gradients reported early, as a backward hook would.
    ABI_OK(mdopt_grads_ready(opt, 3, 3, nullptr));
    mdopt_step_info info = mdopt_step_info_init();
    ABI_OK(mdopt_step(opt, 1.0, nullptr, &info));
    EXPECT_EQ(info.skipped, 0);
    EXPECT_EQ(info.step, s + 1);
    if (skipping) {
      if (gpu) cudaDeviceSynchronize();
      EXPECT_TRUE((gpu ? dw[1]->Download() : w[1]) == tall_before) << "'tall' moved without a gradient";
      mdopt_group_stats st = MDOPT_GROUP_STATS_INIT;
      ABI_OK(mdopt_group_info(opt, "g", &st));
      int size = 1;
      ABI_OK(mdopt_comm_size(comm, &size));
      // One rank: rank 0's "square" has no gradient anywhere either.
      EXPECT_EQ(st.skipped, !reduced && size == 1 ? 2 : 1);
      ABI_OK(mdopt_set_pointers(opt, 1, param_of(1), grad_of(1)));
      ABI_OK(mdopt_set_pointers(opt, 4, param_of(4), grad_of(4)));
    }
#ifdef MDOPT_CUDA_EMULATION
    // A step allocates nothing after the first (the host-staged collectives keep their
    // pinned buffers from the first step on).
    if (gpu && s == 0) allocations = emu::Allocations();
    if (gpu && s > 0) EXPECT_EQ(emu::Allocations(), allocations) << "step " << s;
#endif
  }
  // Each param's own step count: "tall" lacked a gradient at one step, and with grads=local
  // at one rank so did "square" (the passes' bias corrections use these counts, so the
  // comparison with the CPU below holds the kernels to them).
  int size = 1;
  ABI_OK(mdopt_comm_size(comm, &size));
  const bool reduced = std::strstr(c.options, "grads=reduced") != nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    double t = -1;
    ABI_OK(mdopt_get_state(opt, static_cast<int64_t>(i), "step", &t, 1, nullptr));
    const bool lagging = c.skip && (i == 1 || (i == 4 && !reduced && size == 1));
    EXPECT_EQ(t, kSteps - (lagging ? 1 : 0)) << tensors[i].name;
  }
  ABI_OK(mdopt_gather_params(opt, nullptr));
  if (gpu) {
    cudaDeviceSynchronize();
    for (size_t i = 0; i < tensors.size(); ++i) w[i] = dw[i]->Download();
  }
  *out = w;
  ABI_OK(mdopt_destroy(opt));
  ABI_OK(mdopt_comm_destroy(comm));
}

void PrintTo(const Config& c, std::ostream* os) { *os << c.name; }

class CudaSharded : public ::testing::TestWithParam<Config> {};

TEST_P(CudaSharded, MatchesTheCpuBackendAtTheSameRanks) {
  MDOPT_SKIP_WITHOUT_GPU();
  const Config& c = GetParam();
  std::vector<std::vector<uint8_t>> gpu, cpu;
  ASSERT_NO_FATAL_FAILURE(Train(c, true, &gpu));
  ASSERT_NO_FATAL_FAILURE(Train(c, false, &cpu));
  const double bound = c.pd == MDOPT_DTYPE_BF16 ? 1.0 / 128 : 2e-5;
  double worst = 0.0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const std::vector<double> a = AsDouble(gpu[i], c.pd), b = AsDouble(cpu[i], c.pd);
    const double e = testing::RelMaxError(a, b);
    worst = std::max(worst, e);
    EXPECT_LE(e, bound) << "tensor " << Tensors(c.spec)[i].name;
  }
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank == 0) std::printf("MDOPT_METRIC sharded_np%d.%s %.3e %.1e\n", size, c.name, worst, bound);
}

const Config kConfigs[] = {
    {"md_muon_rows", "md-muon", "", "", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"md_muon_rows_bf16_wire_padded", "md-muon", "", "ns_comm_dtype=bf16 comm_pad=on", MDOPT_DTYPE_BF16,
     MDOPT_DTYPE_F32},
    {"md_muon_owner", "md-muon", "layout=owner", "", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"md_adamw_reduced_deferred", "md-adamw", "", "grads=reduced gather=deferred", MDOPT_DTYPE_F32,
     MDOPT_DTYPE_F32},
    {"router_bf16", "router", "", "grad_comm_dtype=bf16", MDOPT_DTYPE_BF16, MDOPT_DTYPE_BF16},
    {"tangent_col_sphere", "md-adamw", "sphere=col tangent=1", "update_norms=1", MDOPT_DTYPE_F32,
     MDOPT_DTYPE_F32},
    {"glu_blocks_rows", "md-muon", "blocks=rows:2", "", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"glu_blocks_owner_bf16", "md-adamw", "blocks=rows:2 layout=owner", "", MDOPT_DTYPE_BF16,
     MDOPT_DTYPE_F32},
    // The blocks' shared column/scalar gains: gradients summed over the blocks after the
    // cross-row record (rows) or at the one owner of all of a matrix's blocks (owner).
    {"glu_blocks_scalar_owner", "md-muon", "blocks=rows:2 gains=scalar tangent=1 layout=owner", "",
     MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"glu_blocks_col_rows_preserve_fan_in", "md-adamw",
     "blocks=rows:2 gains=rowcol preserve_init=1 radius=fan_in", "update_norms=1", MDOPT_DTYPE_F32,
     MDOPT_DTYPE_F32},
    // Interleaved blocks: the gradient pack, the finite check and the weight unpack through
    // the row map (grads local, f32: a master in block order), and the gradient read in
    // place through it (grads=reduced) with bf16 params at one owner per matrix.
    {"gqa_groups_rows", "md-muon", "blocks=groups:3:4,2,2", "update_norms=1 grad_comm_dtype=bf16",
     MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"gqa_groups_owner_reduced_bf16", "md-adamw", "blocks=groups:3:4,2,2 layout=owner",
     "grads=reduced", MDOPT_DTYPE_BF16, MDOPT_DTYPE_BF16},
    // The initial norms (summed over ranks in the rows layout) into the gains; fan_in radii
    // from the global shape.
    {"preserve_init_col_fan_in", "md-adamw", "sphere=col gains=col preserve_init=1 radius=fan_in",
     "update_norms=1", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"preserve_init_rows", "md-muon", "preserve_init=1 ns_steps=10", "", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    // Params without a gradient: one on no rank (skipped), one on all but rank 0 (zeros).
    {"skip_owner_local", "md-muon", "layout=owner", "", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, true},
    {"skip_rows_reduced_bf16", "md-adamw", "", "grads=reduced", MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32, true},
    // f32 Adam directions after a skip: the kernels' per-param bias corrections to 2e-5.
    {"skip_rows_local_adamw", "md-adamw", "", "", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32, true},
};

INSTANTIATE_TEST_SUITE_P(Configs, CudaSharded, ::testing::ValuesIn(kConfigs),
                         [](const ::testing::TestParamInfo<Config>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace mdopt

// MPI is initialised by the first mdopt_comm_create_mpi (and finalised by mdopt at exit);
// gtest's output comes from every rank, each test's verdict from each rank's own comparison.
int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
