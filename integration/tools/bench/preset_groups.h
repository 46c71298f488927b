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

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_PRESET_GROUPS_H_
