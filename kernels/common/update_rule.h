// The math of one parameter's update, as plain values: what DESIGN.md section 1 calls a
// group's spec after parsing. Kernels of every device read only this; parsing lives in
// dist_opt. AutoRadius and MuonScaleFactor are per-matrix constants, computed on the host.
#ifndef MDOPT_KERNELS_COMMON_UPDATE_RULE_H_
#define MDOPT_KERNELS_COMMON_UPDATE_RULE_H_

#include <cstdint>

#include "kernels/common/host_device.h"

namespace mdopt::kernels {

enum class Base { kAdamW, kMuon };
enum class Sphere { kNone, kFrobenius, kRow, kCol };
enum class Gains { kNone, kScalar, kRow, kCol, kRowCol };
enum class GainParam { kSoftplus, kDirect, kExp };
enum class MuonScale { kRatio, kMax1, kRms, kNone };
enum class RadiusMode { kAuto, kInit, kValue, kFanIn };
// kQuintic cycles its five tuples (ns_steps a multiple of 5, as the authors' Newton-Schulz);
// kQuinticHold runs them once and then repeats the last one (any ns_steps).
enum class NsCoeffSet { kQuintic, kJordan, kPolarExpress, kQuinticHold };

struct UpdateRule {
  Base base = Base::kMuon;
  Sphere sphere = Sphere::kFrobenius;
  RadiusMode radius_mode = RadiusMode::kAuto;
  double radius_value = 0.0;  // used when radius_mode == kValue
  // Per parameter (mdopt_param_desc.radius_scale, 1 when not given): multiplies the radius of
  // radius=auto, fan_in and a number; radius=init ignores it.
  double radius_scale = 1.0;
  Gains gains = Gains::kRowCol;
  GainParam gain_param = GainParam::kSoftplus;
  double lr = 8e-3;
  double gain_lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  NsCoeffSet ns_coeffs = NsCoeffSet::kQuintic;
  MuonScale muon_scale = MuonScale::kRatio;
  double weight_decay = 0.0;
  bool tangent = false;
};

MDOPT_HD inline bool HasRowGains(Gains g) { return g == Gains::kRow || g == Gains::kRowCol; }
MDOPT_HD inline bool HasColGains(Gains g) { return g == Gains::kCol || g == Gains::kRowCol; }
MDOPT_HD inline bool HasScalarGain(Gains g) { return g == Gains::kScalar; }

// Number of sphere slices of one m x n matrix: 1 (frobenius), m (row), n (col), 0 (none).
MDOPT_HD inline int64_t SphereSlices(Sphere s, int64_t m, int64_t n) {
  switch (s) {
    case Sphere::kFrobenius: return 1;
    case Sphere::kRow: return m;
    case Sphere::kCol: return n;
    case Sphere::kNone: return 0;
  }
  return 0;
}

// Which gains take the initial magnitude under preserve_init=1 (docs/ARCHITECTURE.md, "The
// math"): the factor c_s = ||W_s|| / R_s of each sphere slice s goes into the gains along
// the slice's axis, so that W = gains (x) D is the initial weight with D on its sphere.
// frobenius (one slice): the row gains when the rule has them, else the column gains, else
// the scalar gain, every entry c; row sphere: the row gains, entry i = c_i; col sphere: the
// column gains, entry j = c_j. kNone: this sphere and these gains cannot hold it (the group
// spec refuses preserve_init=1 there); sphere=none has nothing to absorb.
enum class AbsorbInto { kNone, kRow, kCol, kScalar };
MDOPT_HD inline AbsorbInto PreserveInitTarget(Sphere s, Gains g) {
  switch (s) {
    case Sphere::kFrobenius:
      return HasRowGains(g) ? AbsorbInto::kRow
             : HasColGains(g) ? AbsorbInto::kCol
             : HasScalarGain(g) ? AbsorbInto::kScalar
                                : AbsorbInto::kNone;
    case Sphere::kRow: return HasRowGains(g) ? AbsorbInto::kRow : AbsorbInto::kNone;
    case Sphere::kCol: return HasColGains(g) ? AbsorbInto::kCol : AbsorbInto::kNone;
    case Sphere::kNone: return AbsorbInto::kNone;
  }
  return AbsorbInto::kNone;
}

// The radius that `radius=auto` means (DESIGN.md section 1, step 6): the Frobenius norm of
// a 1/sqrt(d) init for the whole matrix, unit rows/columns for row/col spheres.
double AutoRadius(Sphere s, int64_t m, int64_t n);

// The radius that `radius=fan_in` means: the norm of an init with standard deviation
// 1/sqrt(n) (n = d_in): sqrt(m) for frobenius, 1 per row, sqrt(m / n) per column.
double FanInRadius(Sphere s, int64_t m, int64_t n);

// The radius of one sphere slice of an m x n matrix (m, n its global shape) under the rule:
// auto / fan_in / a number, times rule.radius_scale; init: `slice_norm` (its norm at
// registration).
double SliceRadius(const UpdateRule& rule, int64_t m, int64_t n, double slice_norm);

// Shape factor s of U = s * NS(X) for an m x n matrix.
double MuonScaleFactor(MuonScale s, int64_t m, int64_t n);

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_UPDATE_RULE_H_
