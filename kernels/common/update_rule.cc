#include "kernels/common/update_rule.h"

#include <algorithm>
#include <cmath>

namespace mdopt::kernels {

double AutoRadius(Sphere s, int64_t m, int64_t n) {
  if (s == Sphere::kFrobenius) return std::sqrt(static_cast<double>(std::max(m, n)));
  return 1.0;
}

double FanInRadius(Sphere s, int64_t m, int64_t n) {
  const double dm = static_cast<double>(m), dn = static_cast<double>(n);
  switch (s) {
    case Sphere::kFrobenius: return std::sqrt(dm);
    case Sphere::kRow: return 1.0;
    case Sphere::kCol: return std::sqrt(dm / dn);
    case Sphere::kNone: return 1.0;
  }
  return 1.0;
}

double SliceRadius(const UpdateRule& rule, int64_t m, int64_t n, double slice_norm) {
  switch (rule.radius_mode) {
    case RadiusMode::kAuto: return rule.radius_scale * AutoRadius(rule.sphere, m, n);
    case RadiusMode::kFanIn: return rule.radius_scale * FanInRadius(rule.sphere, m, n);
    case RadiusMode::kValue: return rule.radius_scale * rule.radius_value;
    case RadiusMode::kInit: return slice_norm;
  }
  return slice_norm;
}

double MuonScaleFactor(MuonScale s, int64_t m, int64_t n) {
  const double dm = static_cast<double>(m), dn = static_cast<double>(n);
  switch (s) {
    case MuonScale::kRatio: return std::sqrt(std::max(dm / dn, dn / dm));
    case MuonScale::kMax1: return std::max(1.0, std::sqrt(dm / dn));
    case MuonScale::kRms: return 0.2 * std::sqrt(std::max(dm, dn));
    case MuonScale::kNone: return 1.0;
  }
  return 1.0;
}

}  // namespace mdopt::kernels
