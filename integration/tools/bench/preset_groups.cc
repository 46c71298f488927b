#include "preset_groups.h"

#include <cstdio>

namespace mdopt_bench {

const std::vector<PresetGrouping>& PresetTable() {
  // MD presets keep embeddings and the head on unit rows (preset=embedding) and norm gains
  // on plain AdamW (preset=vector), as the method does. The baselines are what their papers
  // train with: Muon and AdamW runs optimize embeddings, head and vectors with AdamW, and
  // nobody decays norm gains, hence weight_decay=0 on their vectors.
  static const std::vector<PresetGrouping> table = {
      {"md-muon", "preset=md-muon", "preset=embedding", "preset=vector"},
      {"md-adamw", "preset=md-adamw", "preset=embedding", "preset=vector"},
      {"muonh", "preset=muonh", "preset=embedding", "preset=vector"},
      {"adamh", "preset=adamh", "preset=embedding", "preset=vector"},
      {"muon", "preset=muon", "preset=adamw", "preset=adamw weight_decay=0"},
      {"adamw", "preset=adamw", "preset=adamw", "preset=adamw weight_decay=0"},
  };
  return table;
}

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const PresetGrouping& g : PresetTable()) names.emplace_back(g.preset);
  return names;
}

const PresetGrouping* FindPreset(const std::string& preset) {
  for (const PresetGrouping& g : PresetTable())
    if (preset == g.preset) return &g;
  return nullptr;
}

Role RoleOf(TensorKind kind) {
  switch (kind) {
    case TensorKind::kMatrix:
    case TensorKind::kExperts: return Role::kMatrix;
    case TensorKind::kEmbedding:
    case TensorKind::kHead: return Role::kTable;
    case TensorKind::kVector: return Role::kVector;
  }
  return Role::kMatrix;
}

const char* RoleGroupName(Role role) {
  switch (role) {
    case Role::kMatrix: return "matrices";
    case Role::kTable: return "embeddings";
    case Role::kVector: return "vectors";
  }
  return "?";
}

const char* RoleSpec(const PresetGrouping& g, Role role) {
  switch (role) {
    case Role::kMatrix: return g.matrix_spec;
    case Role::kTable: return g.table_spec;
    case Role::kVector: return g.vector_spec;
  }
  return "";
}

std::string PresetTableHelp() {
  std::string out =
      "Groups per preset (group spec given to mdopt_add_group):\n"
      "  preset    matrix, experts   embedding, head   vector\n";
  char line[256];
  for (const PresetGrouping& g : PresetTable()) {
    std::snprintf(line, sizeof line, "  %-9s %-17s %-17s %s\n", g.preset, g.matrix_spec,
                  g.table_spec, g.vector_spec);
    out += line;
  }
  return out;
}

}  // namespace mdopt_bench
