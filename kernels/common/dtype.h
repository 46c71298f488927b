// The element types a model's tensors (params, grads) may have; the optimizer's own state is
// float32 (fast path) or float64 (reference) whatever they are.
#ifndef MDOPT_KERNELS_COMMON_DTYPE_H_
#define MDOPT_KERNELS_COMMON_DTYPE_H_

namespace mdopt::kernels {

enum class Dtype { kF32, kBf16 };

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_DTYPE_H_
