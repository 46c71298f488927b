// The gain reparameterisation gamma = phi(r) and its derivative, for float and double.
#ifndef MDOPT_KERNELS_COMMON_GAIN_PARAM_H_
#define MDOPT_KERNELS_COMMON_GAIN_PARAM_H_

#include <cmath>

#include "kernels/common/host_device.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels {

// softplus(r) = log(1 + e^r), written to stay finite for large |r|.
template <typename T>
MDOPT_HD inline T Softplus(T r) {
  return r > T(0) ? r + std::log1p(std::exp(-r)) : std::log1p(std::exp(r));
}

template <typename T>
MDOPT_HD inline T Sigmoid(T r) {
  if (r >= T(0)) return T(1) / (T(1) + std::exp(-r));
  const T e = std::exp(r);
  return e / (T(1) + e);
}

template <typename T>
MDOPT_HD inline T GainValue(GainParam p, T r) {
  switch (p) {
    case GainParam::kSoftplus: return Softplus(r);
    case GainParam::kDirect: return r;
    case GainParam::kExp: return std::exp(r);
  }
  return r;
}

// d gamma / d r.
template <typename T>
MDOPT_HD inline T GainDerivative(GainParam p, T r) {
  switch (p) {
    case GainParam::kSoftplus: return Sigmoid(r);
    case GainParam::kDirect: return T(1);
    case GainParam::kExp: return std::exp(r);
  }
  return T(1);
}

// The raw value whose gain is 1: where every gain starts.
MDOPT_HD inline double GainRawForOne(GainParam p) {
  switch (p) {
    case GainParam::kSoftplus: return std::log(std::expm1(1.0));  // log(e - 1)
    case GainParam::kDirect: return 1.0;
    case GainParam::kExp: return 0.0;
  }
  return 1.0;
}

// The raw value whose gain is g > 0: phi^-1(g) (softplus: log(e^g - 1), written to stay
// finite for large g; direct: g; exp: log g). preserve_init=1 starts gains here.
inline double GainRawFor(GainParam p, double g) {
  switch (p) {
    case GainParam::kSoftplus: return g > 20.0 ? g + std::log1p(-std::exp(-g)) : std::log(std::expm1(g));
    case GainParam::kDirect: return g;
    case GainParam::kExp: return std::log(g);
  }
  return g;
}

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_GAIN_PARAM_H_
