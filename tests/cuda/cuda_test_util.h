// Shared by the CUDA tests: the skip when no GPU is usable, device buffers that free
// themselves, and the numbers the comparisons use. The tests never fail for want of a GPU:
// CI has nvcc but no device, so there every CUDA test reports SKIPPED with the reason.
#ifndef MDOPT_TESTS_CUDA_CUDA_TEST_UTIL_H_
#define MDOPT_TESTS_CUDA_CUDA_TEST_UTIL_H_

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/device_status.h"

// Skips the current test, with the runtime's own reason, when no CUDA device is usable.
#define MDOPT_SKIP_WITHOUT_GPU()                                                      \
  do {                                                                                \
    std::string mdopt_why_;                                                           \
    if (!::mdopt::kernels::cuda::DevicePresent(&mdopt_why_))                          \
      GTEST_SKIP() << "needs a CUDA GPU (" << mdopt_why_ << ")";                      \
  } while (0)

#define MDOPT_ASSERT_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call
#define MDOPT_ASSERT_DEVICE_OK(expr)                                                  \
  do {                                                                                \
    const ::mdopt::kernels::cuda::DeviceStatus mdopt_s_ = (expr);                     \
    ASSERT_TRUE(mdopt_s_.ok()) << #expr << ": " << mdopt_s_.message();                \
  } while (0)

namespace mdopt::testing {

// A device allocation of `count` T, freed with the object.
template <typename T>
class DeviceVec {
 public:
  explicit DeviceVec(size_t count = 0) { Resize(count); }
  ~DeviceVec() {
    if (p_) cudaFree(p_);
  }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  void Resize(size_t count) {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = count;
    if (count > 0 && cudaMalloc(reinterpret_cast<void**>(&p_), count * sizeof(T)) != cudaSuccess)
      p_ = nullptr;
  }
  void Upload(const std::vector<T>& v) {
    Resize(v.size());
    if (!v.empty()) cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    if (n_ > 0) cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

inline std::vector<double> RandomNormal(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = d(gen);
  return v;
}

// max |a - b| / max |b|: the error relative to the tensor's scale.
template <typename A>
double RelMaxError(const std::vector<A>& a, const std::vector<double>& b) {
  double e = 0.0, s = 0.0;
  for (size_t i = 0; i < b.size(); ++i) {
    e = std::max(e, std::abs(static_cast<double>(a[i]) - b[i]));
    s = std::max(s, std::abs(b[i]));
  }
  return s > 0.0 ? e / s : e;
}

// A measured error beside its bound, one line `MDOPT_METRIC <name> <value> <bound>` on stdout
// (launch/device-check.sh gathers them into its summary).
inline void PrintMetric(const std::string& name, double value, double bound) {
  std::printf("MDOPT_METRIC %s %.3e %.1e\n", name.c_str(), value, bound);
}

// ||a - b||_F / ||b||_F.
template <typename A>
double RelFrobError(const std::vector<A>& a, const std::vector<double>& b) {
  double e = 0.0, s = 0.0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    e += d * d;
    s += b[i] * b[i];
  }
  return std::sqrt(e / s);
}

}  // namespace mdopt::testing

#endif  // MDOPT_TESTS_CUDA_CUDA_TEST_UTIL_H_
