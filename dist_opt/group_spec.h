// Group specs: "preset=<name> key=value ..." -> an UpdateRule plus registration options.
// Presets are the table of DESIGN.md section 4; every key is overridable.
#ifndef MDOPT_DIST_OPT_GROUP_SPEC_H_
#define MDOPT_DIST_OPT_GROUP_SPEC_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/update_rule.h"

namespace mdopt {

// How a group's matrices are sharded over N ranks (docs/ARCHITECTURE.md, "Sharding"):
// kRows: every matrix in N row blocks, rank r owns block r; kOwner: every matrix whole on
// one rank. kAuto: the default for the group's rule (DefaultLayout).
enum class Layout { kAuto, kRows, kOwner };

struct GroupSpec {
  std::string preset;
  kernels::UpdateRule rule;
  bool preserve_init = false;
  Layout layout = Layout::kAuto;
  // blocks=rows:K: every matrix of the group is K logical matrices stacked by rows (a GLU
  // fc1's [gate; up] is rows:2), each (m / K) x n. Each block is a matrix of its own: its own
  // sphere and radius, tangent projection, Newton-Schulz (or Adam) update and Muon scale.
  // Row gains stay per row (a block's row gains are its rows'); the column gains and the
  // scalar gain are the fused matrix's, shared by its K blocks (per expert of a stack), their
  // gradient summed over every block's rows. 1: the matrix is one block.
  int64_t row_blocks = 1;
  // blocks=groups:G:h0,h1,...: the matrix's rows are G groups of K = row_blocks pieces of
  // h0, h1, ... rows (a GQA linear_qkv: per query group its Q heads, then K, then V); block
  // j is piece j of every group, in group order (G * hj rows), a matrix as above
  // (kernels/common/row_map.h). With G = 1 the blocks are contiguous and may differ in
  // height (MLA's kv_down). Empty for rows:K.
  int64_t block_groups = 0;
  std::vector<int64_t> block_heights;
};

// The layout of kAuto: rows for Adam-based and row-sphere groups (every rank holds 1/N of
// every matrix's state), owner for the other Muon groups (no Newton-Schulz gather or
// cross-row sums; chosen by measurement, docs/benchmarks.md).
Layout DefaultLayout(const kernels::UpdateRule& rule);
Layout ResolvedLayout(const GroupSpec& spec);
const char* ToString(Layout v);

// Parses a spec. Unknown keys, bad values, repeated keys and contradictions (weight decay
// with a sphere, Muon keys with base=adamw, gain keys with gains=none, radius or tangent=1
// with sphere=none) are InvalidArgument errors whose message names the key.
absl::StatusOr<GroupSpec> ParseGroupSpec(absl::string_view spec);

// The keys that matter for this spec with their values, in a fixed order:
// "preset=md-muon base=muon ...". Parsing it gives the same GroupSpec back (numbers are
// printed to round-trip); keys of features the rule lacks are left out.
std::string CanonicalSpec(const GroupSpec& spec);

// The value of spec key blocks= ("none", "rows:K" or "groups:G:h0,h1,...").
std::string BlocksText(const GroupSpec& spec);

// mdopt_set_group_hparam: sets one of the numbers that may change between steps (beta1,
// beta2, eps, momentum, weight_decay) as mdopt_add_group would have parsed it: the same
// ranges and contradictions (weight decay on a sphere, momentum without Muon). On error g
// is unchanged.
absl::Status SetSpecNumber(GroupSpec* g, absl::string_view key, double value);

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
