// Which group spec each kind of tensor gets under each benchmarked preset: the one table
// of mdopt-bench's grouping (printed by --help).
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_PRESET_GROUPS_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_PRESET_GROUPS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "model_shapes.h"

namespace mdopt_bench {

// The three roles a tensor plays; each becomes one mdopt group named after the role.
enum class Role { kMatrix, kTable, kVector };

struct PresetGrouping {
  const char* preset;       // the name given to --presets
  const char* matrix_spec;  // matrix and experts tensors
  const char* table_spec;   // embedding and head
  const char* vector_spec;  // vector tensors
};

// Every preset mdopt-bench knows, in table order.
const std::vector<PresetGrouping>& PresetTable();
std::vector<std::string> PresetNames();
// nullptr when `preset` is not in the table.
const PresetGrouping* FindPreset(const std::string& preset);

Role RoleOf(TensorKind kind);
const char* RoleGroupName(Role role);
const char* RoleSpec(const PresetGrouping& g, Role role);

// The table as text, for --help.
std::string PresetTableHelp();

// What a group spec makes a rows-layout matrix add to its bucket's cross-row records (the
// sums over ranks of dist_opt/schedule.cc): which gains it has and which sphere. mdopt-bench
// cannot ask libmdopt for a group's rule, so the library's presets are restated here
// (DESIGN.md section 4, dist_opt/group_spec.cc); the spec's own gains=, sphere= and tangent=
// keys apply on top.
enum class SphereKind { kNone, kFrobenius, kRow, kCol };
struct RecordRule {
  bool col_gains = false;    // gains=col or rowcol
  bool scalar_gain = false;  // gains=scalar
  SphereKind sphere = SphereKind::kNone;
  bool tangent = false;
};
// False (and *error set) when the spec names no preset this table knows or a bad value.
bool RecordRuleOfSpec(const std::string& spec, RecordRule* rule, std::string* error);
// Doubles of the per-bucket cross-row record for one rows-layout m x n matrix: n (column
// gains) + 1 (scalar gain) + 1 (frobenius sphere) + n (column sphere).
int64_t CrossRecordDoubles(const RecordRule& rule, int64_t n);
// Doubles of the tangent=1 radial record: 2 (frobenius sphere) or 2 n (column sphere).
int64_t RadialRecordDoubles(const RecordRule& rule, int64_t n);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_PRESET_GROUPS_H_
