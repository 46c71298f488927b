// Which params have a gradient this step, carried in the finite-check record so that every
// rank learns it from the one all-reduce the step already makes (no collective of its own).
//
// The check record is 2 P doubles: [0, P) the sums of squares of the gradient rows, [P, 2P)
// the presence entries. Each rank writes, for param i, 1 when it has a gradient for it and
// kGradAbsent when its gradient pointer is NULL; summed over ranks the entry holds
// (ranks with a gradient) + kGradAbsent * (ranks without one), both counts exact in a double
// for fewer than 2^20 ranks. One rank reads the same entry unsummed.
//
//   - No rank has a gradient: the param is skipped (weights and state untouched).
//   - Some ranks have one (grads=local): the others contributed zeros to the mean, as DDP's
//     unused parameters do; the param steps.
//   - Some ranks have one (grads=reduced): the ranks disagree on what the mean gradient is;
//     the whole step is a no-op on every rank and the host reports the param.
#ifndef MDOPT_KERNELS_COMMON_GRAD_PRESENCE_H_
#define MDOPT_KERNELS_COMMON_GRAD_PRESENCE_H_

#include "kernels/common/host_device.h"

namespace mdopt::kernels {

// Doubles of the check record for `params` params (sums of squares, then presence).
MDOPT_HD inline constexpr long long CheckRecordLength(long long params) { return 2 * params; }

inline constexpr double kGradPresent = 1.0;
inline constexpr double kGradAbsent = 4294967296.0;  // 2^32

// The presence entry one rank writes for a param.
MDOPT_HD inline double GradPresence(const void* grad) {
  return grad != nullptr ? kGradPresent : kGradAbsent;
}
// Some rank has a gradient for the param (the summed entry is not a multiple of 2^32).
MDOPT_HD inline bool SomeRankHasGrad(double summed) {
  return summed - kGradAbsent * static_cast<double>(static_cast<long long>(summed / kGradAbsent)) > 0.0;
}
// Some rank has none.
MDOPT_HD inline bool SomeRankLacksGrad(double summed) { return summed >= kGradAbsent; }

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_GRAD_PRESENCE_H_
