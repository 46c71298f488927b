#include "dist_opt/checkpoint_manifest.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "dist_opt/crc32c.h"
#include "dist_opt/file_io.h"
#include "mdopt/mdopt.h"
#include "nlohmann/json.hpp"

namespace mdopt {
namespace {

using nlohmann::json;

constexpr char kFormatName[] = "mdopt-checkpoint";

absl::Status IoError(absl::string_view what) { return absl::DataLossError(what); }

const char* DtypeName(Dtype d) { return d == Dtype::kF32 ? "f32" : "bf16"; }

// Group keys that decide the layout and meaning of the state; other hyperparameters (lr,
// betas, ...) may change between save and load, and so may the sharding layout.
std::string StateLayoutOf(const GroupSpec& g) {
  const kernels::UpdateRule& r = g.rule;
  return absl::StrCat("base=", ToString(r.base), " sphere=", ToString(r.sphere),
                      " gains=", ToString(r.gains), " gain_param=", ToString(r.gain_param));
}

json ParamJson(const ParamEntry& p, const std::vector<Group>& groups) {
  return {{"name", p.name},
          {"group", groups[p.group].name},
          {"ndim", p.ndim},
          {"shape", {p.shape[0], p.shape[1], p.shape[2]}},
          {"param_dtype", DtypeName(p.param_dtype)},
          {"grad_dtype", DtypeName(p.grad_dtype)}};
}

// A param as one line, for messages: "tall g 2 23 6 0 bf16 f32".
std::string ParamLine(const json& p) {
  const json& s = p.at("shape");
  return absl::StrCat(p.at("name").get<std::string>(), " ", p.at("group").get<std::string>(), " ",
                      p.at("ndim").get<int>(), " ", s.at(0).get<int64_t>(), " ", s.at(1).get<int64_t>(),
                      " ", s.at(2).get<int64_t>(), " ", p.at("param_dtype").get<std::string>(), " ",
                      p.at("grad_dtype").get<std::string>());
}

std::string Hex(uint32_t v) { return absl::StrFormat("%08x", v); }

// The checksum of a manifest: over the compact dump (keys sorted) without "crc32c".
uint32_t ManifestCrc(json j) {
  j.erase("crc32c");
  const std::string s = j.dump();
  return Crc32c(0, s.data(), s.size());
}

// blocks=rows:K with column or scalar gains: the K block slots hold equal copies of their
// matrix's shared gains. The manifest says so ("block_gains": "shared"); a checkpoint of
// such a group without it was written when each block had gains of its own, and its copies
// differ, so it is refused rather than loaded as diverged replicas.
bool SharesBlockGains(const GroupSpec& g) {
  return g.row_blocks > 1 &&
         (kernels::HasColGains(g.rule.gains) || kernels::HasScalarGain(g.rule.gains));
}

}  // namespace

std::string ManifestText(const ManifestContent& c) {
  json j;
  j["format"] = kFormatName;
  j["format_version"] = kCheckpointFormatVersion;
  j["abi_version"] = MDOPT_ABI_VERSION;
  j["engine"] = c.engine;
  j["world_size"] = c.world_size;
  j["step"] = c.step;
  j["param_steps"] = c.param_steps;
  json groups = json::array();
  for (const Group& g : *c.groups) {
    json entry = {{"name", g.name}, {"spec", CanonicalSpec(g.spec)}};
    if (SharesBlockGains(g.spec)) entry["block_gains"] = "shared";
    groups.push_back(std::move(entry));
  }
  j["groups"] = std::move(groups);
  json params = json::array();
  for (const ParamEntry& p : *c.params) params.push_back(ParamJson(p, *c.groups));
  j["params"] = std::move(params);
  j["plan"] = json::parse(c.plan->ToJson());
  json files = json::array();
  for (size_t r = 0; r < c.rank_files.size(); ++r) {
    const WrittenRankFile& f = c.rank_files[r];
    files.push_back({{"rank", r}, {"name", f.name}, {"bytes", f.bytes}, {"crc32c", Hex(f.crc)}});
  }
  j["rank_files"] = std::move(files);
  j["crc32c"] = Hex(ManifestCrc(j));
  return j.dump(1) + "\n";
}

absl::Status ReadManifest(const std::string& dir, const std::string& engine,
                          const std::vector<Group>& groups, const std::vector<ParamEntry>& params,
                          LoadedManifest* out) {
  const std::string path = dir + "/" + kManifestName;
  if (IsMissing(path)) {
    // An older checkpoint: name its version rather than report a missing file.
    std::string old;
    if (ReadWholeFile(dir + "/" + kManifestV1Name, &old).ok()) {
      const std::vector<std::string> head = absl::StrSplit(old.substr(0, old.find('\n')), ' ');
      int version = 0;
      if (head.size() == 2 && head[0] == "mdopt-checkpoint-format" && absl::SimpleAtoi(head[1], &version)) {
        return IoError(absl::StrCat("checkpoint '", dir, "' has format version ", version, " (",
                                    kManifestV1Name, "); this build reads version ",
                                    kCheckpointFormatVersion, " (", kManifestName, ")"));
      }
    }
  }
  std::string text;
  if (absl::Status s = ReadWholeFile(path, &text); !s.ok()) return s;
  const json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return IoError(absl::StrCat("manifest '", path,
                                "' is truncated or damaged: it is not a JSON object, so its "
                                "checksum cannot even be read"));
  }
  auto bad = [&](absl::string_view why) {
    return IoError(absl::StrCat("manifest '", path, "' is malformed: ", why));
  };
  // The version comes before the checksum, so that a newer format is named as such rather
  // than reported as damage.
  if (!j.contains("format") || j["format"] != kFormatName || !j.contains("format_version") ||
      !j["format_version"].is_number_integer()) {
    return IoError(absl::StrCat("'", path, "' is not an mdopt checkpoint manifest"));
  }
  const int version = j["format_version"].get<int>();
  if (version != kCheckpointFormatVersion) {
    return IoError(absl::StrCat("checkpoint '", path, "' has format version ", version,
                                "; this build reads version ", kCheckpointFormatVersion));
  }
  uint32_t want_crc = 0;
  if (!j.contains("crc32c") || !j["crc32c"].is_string() ||
      !absl::SimpleHexAtoi(j["crc32c"].get<std::string>(), &want_crc)) {
    return bad("no crc32c (truncated?)");
  }
  if (ManifestCrc(j) != want_crc) {
    return IoError(absl::StrCat("manifest '", path, "' fails its checksum (damaged file)"));
  }

  auto mismatch = [&](absl::string_view what) {
    return IoError(absl::StrCat("checkpoint '", dir, "' does not match this optimizer: ", what));
  };
  try {
    const std::string their_engine = j.at("engine").get<std::string>();
    if (their_engine != engine) {
      return mismatch(absl::StrCat("it was written by kernels=", their_engine,
                                   ", this optimizer uses kernels=", engine));
    }
    out->world_size = j.at("world_size").get<int>();
    out->step = j.at("step").get<int64_t>();
    if (out->world_size < 1) return bad("world_size < 1");
    if (out->step < 0) return bad("step < 0");

    // Groups: same names, same state layout (layout= and hyperparameters may differ).
    const json& g = j.at("groups");
    if (g.size() != groups.size()) {
      return mismatch(absl::StrCat(g.size(), " groups, this optimizer has ", groups.size()));
    }
    for (size_t k = 0; k < groups.size(); ++k) {
      const Group& ours = groups[k];
      const std::string name = g[k].at("name").get<std::string>();
      if (name != ours.name) {
        return mismatch(absl::StrCat("group ", k, " is '", name, "', expected '", ours.name, "'"));
      }
      absl::StatusOr<GroupSpec> theirs = ParseGroupSpec(g[k].at("spec").get<std::string>());
      if (!theirs.ok()) return mismatch(absl::StrCat("group '", ours.name, "': ", theirs.status().message()));
      if (StateLayoutOf(*theirs) != StateLayoutOf(ours.spec)) {
        return mismatch(absl::StrCat("group '", ours.name, "' was saved with ", StateLayoutOf(*theirs),
                                     ", this optimizer has ", StateLayoutOf(ours.spec)));
      }
      if (SharesBlockGains(ours.spec) &&
          (!g[k].contains("block_gains") || g[k].at("block_gains") != "shared")) {
        return mismatch(absl::StrCat(
            "group '", ours.name, "' (blocks=rows:", ours.spec.row_blocks,
            ") was saved when each row block had column and scalar gains of its own; this "
            "build shares them over a matrix's blocks"));
      }
    }
    const json& p = j.at("params");
    if (p.size() != params.size()) {
      return mismatch(absl::StrCat(p.size(), " params, this optimizer has ", params.size()));
    }
    int64_t slots = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string theirs = ParamLine(p[i]), ours = ParamLine(ParamJson(params[i], groups));
      if (theirs != ours) {
        return mismatch(absl::StrCat("param ", i, " is '", theirs, "', expected '", ours, "'"));
      }
      slots += params[i].experts;
    }

    // Each param's own count (after the params matched), at most the optimizer's. A
    // manifest without them predates them: every param used the optimizer's count.
    if (j.contains("param_steps")) {
      const json& ps = j.at("param_steps");
      if (!ps.is_array() || ps.size() != params.size()) {
        return bad("param_steps does not hold one count per param");
      }
      out->param_steps = ps.get<std::vector<int64_t>>();
      for (int64_t t : out->param_steps) {
        if (t < 0 || t > out->step) return bad("a param_steps count is not in [0, step]");
      }
    } else {
      out->param_steps.assign(params.size(), out->step);
    }

    // The saving run's plan: which rows of which slot each of its rank files holds.
    const json& plan = j.at("plan");
    if (plan.at("world").get<int>() != out->world_size) return bad("plan.world differs from world_size");
    const json& ps = plan.at("slots");
    if (static_cast<int64_t>(ps.size()) != slots) return bad("plan has another number of slots");
    out->slots.clear();
    out->first_slot.clear();
    for (size_t i = 0; i < params.size(); ++i) {
      out->first_slot.push_back(static_cast<int64_t>(out->slots.size()));
      for (int64_t e = 0; e < params[i].experts; ++e) {
        const json& s = ps[out->slots.size()];
        SlotPlan sp;
        sp.param = s.at("param").get<int64_t>();
        sp.expert = s.at("expert").get<int64_t>();
        sp.m = s.at("m").get<int64_t>();
        sp.n = s.at("n").get<int64_t>();
        sp.row0 = params[i].SlotRow0(e);
        sp.owner = s.at("owner").get<int>();
        sp.block_rows = s.at("block_rows").get<int64_t>();
        const std::string layout = s.at("layout").get<std::string>();
        sp.layout = layout == "rows" ? Layout::kRows : Layout::kOwner;
        const bool fits = sp.param == static_cast<int64_t>(i) && sp.expert == e &&
                          sp.m == params[i].SlotM(e) && sp.n == params[i].n &&
                          (layout == "rows" || layout == "owner") && sp.owner >= 0 &&
                          sp.owner < out->world_size &&
                          (layout == "owner" || sp.block_rows * out->world_size >= sp.m) &&
                          sp.block_rows >= 0;
        if (!fits) {
          return bad(absl::StrCat("plan slot ", out->slots.size(), " does not fit param '",
                                  params[i].name, "'"));
        }
        out->slots.push_back(sp);
      }
    }

    const json& files = j.at("rank_files");
    if (static_cast<int>(files.size()) != out->world_size) {
      return bad("world_size does not match the rank files listed");
    }
    out->rank_files.clear();
    for (size_t r = 0; r < files.size(); ++r) {
      WrittenRankFile f;
      f.name = files[r].at("name").get<std::string>();
      f.bytes = files[r].at("bytes").get<uint64_t>();
      int file_rank = -1;
      if (files[r].at("rank").get<size_t>() != r ||
          !absl::SimpleHexAtoi(files[r].at("crc32c").get<std::string>(), &f.crc) ||
          !ParseRankFileName(f.name, &file_rank) || file_rank != static_cast<int>(r) ||
          f.name != RankFileName(file_rank, f.crc)) {
        return bad(absl::StrCat("rank file entry ", r, " ('", f.name, "') is not an mdopt rank file of rank ", r));
      }
      out->rank_files.push_back(std::move(f));
    }
  } catch (const json::exception& e) {
    return bad(e.what());
  }
  return absl::OkStatus();
}

}  // namespace mdopt
