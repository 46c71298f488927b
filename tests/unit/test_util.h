// Shared helpers for mdopt's tests: the reference vectors, random tensors, and an optimizer
// driven through the C ABI with its own parameter and gradient buffers.
#ifndef MDOPT_TESTS_UNIT_TEST_UTIL_H_
#define MDOPT_TESTS_UNIT_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/bf16.h"
#include "mdopt/mdopt.h"
#include "nlohmann/json.hpp"

namespace mdopt::testing {

// A file of float64 trajectories in tests/data (md-vectors.json, md-block-vectors.json).
inline nlohmann::json LoadVectors(const std::string& file = "md-vectors.json") {
  std::ifstream in(std::string(MDOPT_TEST_DATA_DIR) + "/" + file);
  EXPECT_TRUE(in.good()) << "cannot open " << file;
  return nlohmann::json::parse(in);
}

// A trajectory case's group spec: "preset=<preset> key=value ..." from its overrides.
inline std::string VectorsSpecOf(const nlohmann::json& c) {
  std::string spec = "preset=" + c["preset"].get<std::string>();
  for (const auto& [key, value] : c["overrides"].items()) {
    spec += " " + key + "=";
    if (value.is_boolean()) {
      spec += value.get<bool>() ? "1" : "0";
    } else if (value.is_string()) {
      spec += value.get<std::string>();
    } else {
      spec += value.dump();
    }
  }
  return spec;
}

// A matrix stored as a list of rows, flattened row-major.
inline std::vector<double> FlattenRows(const nlohmann::json& m) {
  std::vector<double> v;
  for (const auto& row : m)
    for (const auto& x : row) v.push_back(x.get<double>());
  return v;
}

// Why ns_dtype=bf16 cannot run here, for GTEST_SKIP(): mdopt_runtime_info() tells a build
// without oneDNN from a CPU without bf16 matmul.
inline std::string Bf16SkipReason() {
  const std::string info = mdopt_runtime_info();
  if (info.find("onednn_bf16=no-build") != std::string::npos) {
    return "ns_dtype=bf16: this build has no oneDNN (install libdnnl-dev and rebuild)";
  }
  return "ns_dtype=bf16: this CPU has no bf16 matmul (needs AVX512_BF16 or AMX)";
}

// Deterministic normal samples.
inline std::vector<double> RandomNormal(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

// max |a - b| / max |b| (0 when both are zero).
inline double RelMaxError(const std::vector<double>& a, const std::vector<double>& b) {
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(a[i] - b[i]));
    ref = std::max(ref, std::abs(b[i]));
  }
  return ref > 0.0 ? err / ref : err;
}

#define MDOPT_ASSERT_OK(call)                                                   \
  do {                                                                          \
    mdopt_status _s = (call);                                                   \
    ASSERT_EQ(_s, MDOPT_SUCCESS) << #call << ": " << mdopt_status_string(_s)    \
                                 << ": " << mdopt_last_error();                 \
  } while (0)

// One tensor as a test registers it.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  mdopt_dtype param_dtype = MDOPT_DTYPE_F32;
  mdopt_dtype grad_dtype = MDOPT_DTYPE_F32;
  double radius_scale = 0.0;  // mdopt_param_desc.radius_scale (0: not given)
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

// The descriptor of a tensor with its buffers. It keeps `name` and `group` as pointers: they must outlive its use. String
// literals (static storage) take the const char* overload; a std::string must be an object
// that lives on (not a temporary built from a literal, which dies with the call's statement).
inline mdopt_param_desc DescFor(const char* name, const char* group,
                                const std::vector<int64_t>& shape, mdopt_dtype param_dtype,
                                void* param, mdopt_dtype grad_dtype, const void* grad) {
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  d.name = name;
  d.group = group;
  d.ndim = static_cast<int>(shape.size());
  for (size_t k = 0; k < shape.size() && k < 3; ++k) d.shape[k] = shape[k];
  d.param_dtype = param_dtype;
  d.param = param;
  d.grad_dtype = grad_dtype;
  d.grad = grad;
  return d;
}
inline mdopt_param_desc DescFor(const std::string& name, const std::string& group,
                                const std::vector<int64_t>& shape, mdopt_dtype param_dtype,
                                void* param, mdopt_dtype grad_dtype, const void* grad) {
  return DescFor(name.c_str(), group.c_str(), shape, param_dtype, param, grad_dtype, grad);
}

// Buffers of one tensor in the dtype the optimizer sees.
struct Buffers {
  std::vector<float> param_f32, grad_f32;
  std::vector<uint16_t> param_bf16, grad_bf16;
  void* param() { return param_f32.empty() ? static_cast<void*>(param_bf16.data()) : param_f32.data(); }
  const void* grad() const {
    return grad_f32.empty() ? static_cast<const void*>(grad_bf16.data()) : grad_f32.data();
  }
};

inline void Fill(const std::vector<double>& v, mdopt_dtype dt, std::vector<float>* f,
                 std::vector<uint16_t>* h) {
  f->clear();
  h->clear();
  for (double x : v) {
    if (dt == MDOPT_DTYPE_F32) {
      f->push_back(static_cast<float>(x));
    } else {
      h->push_back(kernels::FloatToBf16(static_cast<float>(x)));
    }
  }
}

// An optimizer with one group and its tensors, all through the C ABI.
class AbiHarness {
 public:
  AbiHarness(const std::string& options, const std::string& spec,
             const std::vector<TensorSpec>& tensors, uint64_t seed)
      : tensors_(tensors), bufs_(tensors.size()) {
    EXPECT_EQ(mdopt_comm_create_local(&comm_), MDOPT_SUCCESS);
    EXPECT_EQ(mdopt_create(comm_, options.c_str(), &opt_), MDOPT_SUCCESS) << mdopt_last_error();
    EXPECT_EQ(mdopt_add_group(opt_, kGroup.c_str(), spec.c_str()), MDOPT_SUCCESS) << mdopt_last_error();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorSpec& t = tensors[i];
      // Weights of a 1/sqrt(d_in) init, so that spheres and gains see realistic norms.
      const double scale = 1.0 / std::sqrt(static_cast<double>(t.shape.back()));
      Fill(RandomNormal(t.numel(), seed * 1000 + i, scale), t.param_dtype,
           &bufs_[i].param_f32, &bufs_[i].param_bf16);
      Fill(std::vector<double>(t.numel(), 0.0), t.grad_dtype, &bufs_[i].grad_f32,
           &bufs_[i].grad_bf16);
      mdopt_param_desc d = DescFor(t.name, kGroup, t.shape, t.param_dtype, bufs_[i].param(),
                                   t.grad_dtype, bufs_[i].grad());
      d.radius_scale = t.radius_scale;
      EXPECT_EQ(mdopt_add_param(opt_, &d, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
    }
  }
  ~AbiHarness() {
    mdopt_destroy(opt_);
    mdopt_comm_destroy(comm_);
  }
  AbiHarness(const AbiHarness&) = delete;
  AbiHarness& operator=(const AbiHarness&) = delete;

  mdopt_optimizer* opt() { return opt_; }
  size_t size() const { return tensors_.size(); }
  const TensorSpec& tensor(size_t i) const { return tensors_[i]; }
  Buffers& buffers(size_t i) { return bufs_[i]; }

  // Gradients for a step: deterministic in (seed, step, tensor).
  void SetGradients(uint64_t seed, int step) {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const std::vector<double> g = RandomNormal(tensors_[i].numel(), seed * 7919 + step * 131 + i, 0.1);
      const mdopt_dtype dt = tensors_[i].grad_dtype;
      for (size_t k = 0; k < g.size(); ++k) {
        if (dt == MDOPT_DTYPE_F32) {
          bufs_[i].grad_f32[k] = static_cast<float>(g[k]);
        } else {
          bufs_[i].grad_bf16[k] = kernels::FloatToBf16(static_cast<float>(g[k]));
        }
      }
    }
  }

  std::vector<double> State(size_t i, const char* field) {
    int64_t n = 0;
    EXPECT_EQ(mdopt_get_state(opt_, static_cast<int64_t>(i), field, nullptr, 0, &n), MDOPT_SUCCESS)
        << field << ": " << mdopt_last_error();
    std::vector<double> v(static_cast<size_t>(n));
    EXPECT_EQ(mdopt_get_state(opt_, static_cast<int64_t>(i), field, v.data(), n, nullptr), MDOPT_SUCCESS);
    return v;
  }

  // Gradients for `step`, then one step that must be taken as step number `step`.
  void StepChecked(uint64_t seed, int step) {
    SetGradients(seed, step);
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(opt_, 1.0, nullptr, &info));
    ASSERT_EQ(info.step, step);
    ASSERT_EQ(info.skipped, 0);
  }

  // The model's tensor as doubles.
  std::vector<double> Model(size_t i) {
    std::vector<double> v;
    for (float f : bufs_[i].param_f32) v.push_back(f);
    for (uint16_t h : bufs_[i].param_bf16) v.push_back(kernels::Bf16ToFloat(h));
    return v;
  }

 private:
  const std::string kGroup = "g";
  std::vector<TensorSpec> tensors_;
  std::vector<Buffers> bufs_;
  mdopt_comm* comm_ = nullptr;
  mdopt_optimizer* opt_ = nullptr;
};

}  // namespace mdopt::testing

#endif  // MDOPT_TESTS_UNIT_TEST_UTIL_H_
