// Newton-Schulz coefficient sets: one (a, b, c) per iteration of
//   X <- a X + (b A + c A^2) X,  A = X X^T.
#ifndef MDOPT_KERNELS_COMMON_NS_COEFFS_H_
#define MDOPT_KERNELS_COMMON_NS_COEFFS_H_

#include "kernels/common/update_rule.h"

namespace mdopt::kernels {

struct NsTuple {
  double a, b, c;
};

// The tuple of iteration k (0-based). kQuintic cycles its five tuples (iteration k uses
// tuple k mod 5; the group spec admits only multiples of 5, see kQuinticSetSize);
// kQuinticHold, Polar Express and Jordan repeat their last tuple past their length.
NsTuple NsCoefficients(NsCoeffSet set, int k);

// Number of tuples of the quintic set: ns_steps of ns_coeffs=quintic is a multiple of it.
inline constexpr int kQuinticSetSize = 5;

// How the iteration is evaluated (option ns_form): kStandard iterates on X itself, kGram on
// the Gram matrix X X^T alone (cheaper for rectangular X, see kernels/cpu/newton_schulz.h);
// kAuto leaves the choice to the backend by shape.
enum class NsForm { kAuto, kStandard, kGram };

// Newton-Schulz normalises its input by ||X||_F + kNsNormEps first.
inline constexpr double kNsNormEps = 1e-7;

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_NS_COEFFS_H_
