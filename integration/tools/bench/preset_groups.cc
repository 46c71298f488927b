#include "preset_groups.h"

#include <cstdio>
#include <map>
#include <sstream>

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

bool RecordRuleOfSpec(const std::string& spec, RecordRule* rule, std::string* error) {
  using S = SphereKind;
  // {column gains, scalar gain, sphere} of every preset of the library.
  static const std::map<std::string, RecordRule> presets = {
      {"md-muon", {true, false, S::kFrobenius, false}},
      {"md-adamw", {true, false, S::kFrobenius, false}},
      {"muon", {false, false, S::kNone, false}},
      {"adamw", {false, false, S::kNone, false}},
      {"muonh", {false, false, S::kFrobenius, false}},
      {"adamh", {false, false, S::kFrobenius, false}},
      {"router", {true, false, S::kRow, false}},
      {"embedding", {false, false, S::kRow, false}},
      {"vector", {false, false, S::kNone, false}},
  };
  static const std::map<std::string, SphereKind> spheres = {
      {"none", S::kNone}, {"frobenius", S::kFrobenius}, {"row", S::kRow}, {"col", S::kCol}};
  std::map<std::string, std::string> keys;
  std::istringstream in(spec);
  for (std::string token; in >> token;) {
    const size_t eq = token.find('=');
    if (eq != std::string::npos) keys[token.substr(0, eq)] = token.substr(eq + 1);
  }
  const auto preset = presets.find(keys["preset"]);
  if (preset == presets.end()) {
    *error = "group spec '" + spec + "': no record rule for preset '" + keys["preset"] + "'";
    return false;
  }
  RecordRule r = preset->second;
  if (auto g = keys.find("gains"); g != keys.end()) {
    if (g->second != "none" && g->second != "scalar" && g->second != "row" &&
        g->second != "col" && g->second != "rowcol") {
      *error = "group spec '" + spec + "': bad gains '" + g->second + "'";
      return false;
    }
    r.col_gains = g->second == "col" || g->second == "rowcol";
    r.scalar_gain = g->second == "scalar";
  }
  if (auto s = keys.find("sphere"); s != keys.end()) {
    const auto kind = spheres.find(s->second);
    if (kind == spheres.end()) {
      *error = "group spec '" + spec + "': bad sphere '" + s->second + "'";
      return false;
    }
    r.sphere = kind->second;
  }
  if (auto t = keys.find("tangent"); t != keys.end()) {
    r.tangent = t->second == "1" || t->second == "true";
  }
  *rule = r;
  return true;
}

int64_t CrossRecordDoubles(const RecordRule& rule, int64_t n) {
  return (rule.col_gains ? n : 0) + (rule.scalar_gain ? 1 : 0) +
         (rule.sphere == SphereKind::kFrobenius ? 1 : 0) +
         (rule.sphere == SphereKind::kCol ? n : 0);
}

int64_t RadialRecordDoubles(const RecordRule& rule, int64_t n) {
  if (!rule.tangent) return 0;
  if (rule.sphere == SphereKind::kFrobenius) return 2;
  if (rule.sphere == SphereKind::kCol) return 2 * n;
  return 0;
}

}  // namespace mdopt_bench
