// Group specs: "preset=<name> key=value ..." -> an UpdateRule plus registration options.
// Presets are the table of DESIGN.md section 4; every key is overridable.
#ifndef MDOPT_DIST_OPT_GROUP_SPEC_H_
#define MDOPT_DIST_OPT_GROUP_SPEC_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/cpu/update_rule.h"

namespace mdopt {

struct GroupSpec {
  std::string preset;
  kernels::UpdateRule rule;
  bool preserve_init = false;
};

// Parses a spec. Unknown keys, bad values, repeated keys and contradictions (weight decay
// with a sphere, Muon keys with base=adamw, gain keys with gains=none, radius or tangent=1
// with sphere=none) are InvalidArgument errors whose message names the key.
absl::StatusOr<GroupSpec> ParseGroupSpec(absl::string_view spec);

// The keys that matter for this spec with their values, in a fixed order:
// "preset=md-muon base=muon ...". Parsing it gives the same GroupSpec back (numbers are
// printed to round-trip); keys of features the rule lacks are left out.
std::string CanonicalSpec(const GroupSpec& spec);

// The names accepted by preset=.
const std::vector<std::string>& PresetNames();

// Text forms of the enums, as spec values.
const char* ToString(kernels::Base v);
const char* ToString(kernels::Sphere v);
const char* ToString(kernels::Gains v);
const char* ToString(kernels::GainParam v);
const char* ToString(kernels::MuonScale v);
const char* ToString(kernels::NsCoeffSet v);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_GROUP_SPEC_H_
