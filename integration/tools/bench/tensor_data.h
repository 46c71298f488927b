// The model's weights and gradients as the trainer would hold them: one buffer per tensor
// in the chosen dtypes, filled from a seeded generator so every preset and engine sees the
// same weights and the same gradient of step k.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_TENSOR_DATA_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_TENSOR_DATA_H_

#include <cstdint>
#include <vector>

#include "mdopt/mdopt.h"
#include "model_shapes.h"

namespace mdopt_bench {

class ModelBuffers {
 public:
  ModelBuffers(const std::vector<TensorShape>& shapes, mdopt_dtype param_dtype,
               mdopt_dtype grad_dtype);

  // Weights N(0, 1/d_in); vectors start at 1 (they are norm gains). The optimizer
  // overwrites the weights, so each run calls this first to start from the same point.
  void ResetWeights(uint64_t seed);
  // Gradients N(0, 1) of step `step` (counted from 0 over warm-up and timed steps).
  void FillGradients(uint64_t seed, int64_t step);

  void* param(size_t i) { return params_[i].data(); }
  const void* grad(size_t i) const { return grads_[i].data(); }
  mdopt_dtype param_dtype() const { return param_dtype_; }
  mdopt_dtype grad_dtype() const { return grad_dtype_; }

 private:
  // One tensor in either dtype: exactly one of the two vectors is in use.
  class Buffer {
   public:
    Buffer(int64_t numel, mdopt_dtype dtype);
    void* data() { return f32_.empty() ? static_cast<void*>(bf16_.data()) : f32_.data(); }
    const void* data() const {
      return f32_.empty() ? static_cast<const void*>(bf16_.data()) : f32_.data();
    }
    // Stores the float values, rounding them to bf16 when the buffer is bf16.
    void Store(const std::vector<float>& values);

   private:
    std::vector<float> f32_;
    std::vector<uint16_t> bf16_;  // bf16 as its top 16 bits, the ABI's layout
  };

  std::vector<TensorShape> shapes_;
  mdopt_dtype param_dtype_, grad_dtype_;
  std::vector<Buffer> params_, grads_;
  std::vector<float> scratch_;
};

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_TENSOR_DATA_H_
