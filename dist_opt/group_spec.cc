#include "dist_opt/group_spec.h"

#include <cmath>
#include <functional>
#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "dist_opt/key_values.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/common/row_map.h"

namespace mdopt {
namespace {

using kernels::Base;
using kernels::GainParam;
using kernels::Gains;
using kernels::MuonScale;
using kernels::NsCoeffSet;
using kernels::RadiusMode;
using kernels::Sphere;
using kernels::UpdateRule;

template <typename E>
struct EnumName {
  E value;
  const char* name;
};

constexpr EnumName<Base> kBases[] = {{Base::kMuon, "muon"}, {Base::kAdamW, "adamw"}};
constexpr EnumName<Sphere> kSpheres[] = {{Sphere::kNone, "none"},
                                         {Sphere::kFrobenius, "frobenius"},
                                         {Sphere::kRow, "row"},
                                         {Sphere::kCol, "col"}};
constexpr EnumName<Gains> kGains[] = {{Gains::kNone, "none"},     {Gains::kScalar, "scalar"},
                                      {Gains::kRow, "row"},       {Gains::kCol, "col"},
                                      {Gains::kRowCol, "rowcol"}};
constexpr EnumName<GainParam> kGainParams[] = {{GainParam::kSoftplus, "softplus"},
                                               {GainParam::kDirect, "direct"},
                                               {GainParam::kExp, "exp"}};
constexpr EnumName<MuonScale> kMuonScales[] = {{MuonScale::kRatio, "ratio"},
                                               {MuonScale::kMax1, "max1"},
                                               {MuonScale::kRms, "rms"},
                                               {MuonScale::kNone, "none"}};
constexpr EnumName<Layout> kLayouts[] = {{Layout::kAuto, "auto"}, {Layout::kRows, "rows"},
                                         {Layout::kOwner, "owner"}};
constexpr EnumName<NsCoeffSet> kNsSets[] = {{NsCoeffSet::kQuintic, "quintic"},
                                            {NsCoeffSet::kJordan, "jordan"},
                                            {NsCoeffSet::kPolarExpress, "polar_express"},
                                            {NsCoeffSet::kQuinticHold, "quintic_hold"}};

template <typename E, size_t N>
const char* NameOf(const EnumName<E> (&table)[N], E v) {
  for (const auto& e : table)
    if (e.value == v) return e.name;
  return "?";
}

template <typename E, size_t N>
absl::Status ParseEnum(const EnumName<E> (&table)[N], absl::string_view key,
                       absl::string_view value, E* out) {
  std::vector<std::string> names;
  for (const auto& e : table) {
    if (value == e.name) {
      *out = e.value;
      return absl::OkStatus();
    }
    names.emplace_back(e.name);
  }
  return absl::InvalidArgumentError(absl::StrCat("spec key '", key, "': bad value '", value,
                                                 "' (one of ", absl::StrJoin(names, ", "), ")"));
}

absl::Status ParseNumber(absl::string_view key, absl::string_view value, double lo, bool lo_open,
                         double hi, bool hi_open, double* out) {
  double v;
  if (!absl::SimpleAtod(value, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec key '", key, "': '", value, "' is not a finite number"));
  }
  const bool lo_bad = lo_open ? !(v > lo) : !(v >= lo);
  const bool hi_bad = hi_open ? !(v < hi) : !(v <= hi);
  if (lo_bad || hi_bad) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "spec key '%s': %s is outside %c%g, %g%c", std::string(key), std::string(value),
        lo_open ? '(' : '[', lo, hi, hi_open ? ')' : ']'));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status ParseBool(absl::string_view key, absl::string_view value, bool* out) {
  if (value == "1" || value == "true") {
    *out = true;
  } else if (value == "0" || value == "false") {
    *out = false;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("spec key '", key, "': bad value '", value, "' (0, 1, true or false)"));
  }
  return absl::OkStatus();
}

constexpr double kInf = HUGE_VAL;

// One row of DESIGN.md section 4's preset table.
GroupSpec Preset(Base base, Sphere sphere, RadiusMode radius_mode, double radius_value,
                 Gains gains, double lr, double gain_lr, double weight_decay, MuonScale scale) {
  GroupSpec g;
  g.rule.base = base;
  g.rule.sphere = sphere;
  g.rule.radius_mode = radius_mode;
  g.rule.radius_value = radius_value;
  g.rule.gains = gains;
  g.rule.lr = lr;
  g.rule.gain_lr = gain_lr;
  g.rule.weight_decay = weight_decay;
  g.rule.muon_scale = scale;
  return g;
}

const std::map<std::string, GroupSpec>& Presets() {
  static const auto* presets = [] {
    auto* p = new std::map<std::string, GroupSpec>();
    const auto A = RadiusMode::kAuto;
    // gain_lr is 1e-3 everywhere, also where the preset has no gains, so that turning gains
    // on over any preset gets the paper's gain learning rate rather than frozen gains.
    (*p)["md-muon"] = Preset(Base::kMuon, Sphere::kFrobenius, A, 0, Gains::kRowCol, 8e-3, 1e-3, 0, MuonScale::kRatio);
    (*p)["md-adamw"] = Preset(Base::kAdamW, Sphere::kFrobenius, A, 0, Gains::kRowCol, 1e-3, 1e-3, 0, MuonScale::kRatio);
    (*p)["muon"] = Preset(Base::kMuon, Sphere::kNone, A, 0, Gains::kNone, 2e-2, 1e-3, 0.1, MuonScale::kMax1);
    (*p)["adamw"] = Preset(Base::kAdamW, Sphere::kNone, A, 0, Gains::kNone, 1e-3, 1e-3, 0.1, MuonScale::kRatio);
    (*p)["muonh"] = Preset(Base::kMuon, Sphere::kFrobenius, A, 0, Gains::kNone, 8e-3, 1e-3, 0, MuonScale::kRatio);
    (*p)["router"] = Preset(Base::kMuon, Sphere::kRow, A, 0, Gains::kRowCol, 8e-3, 1e-3, 0, MuonScale::kNone);
    (*p)["adamh"] = Preset(Base::kAdamW, Sphere::kFrobenius, A, 0, Gains::kNone, 1e-3, 1e-3, 0, MuonScale::kRatio);
    (*p)["embedding"] = Preset(Base::kAdamW, Sphere::kRow, RadiusMode::kValue, 1.0, Gains::kNone, 3e-3, 1e-3, 0, MuonScale::kRatio);
    (*p)["vector"] = Preset(Base::kAdamW, Sphere::kNone, A, 0, Gains::kNone, 1e-3, 1e-3, 0, MuonScale::kRatio);
    for (auto& [name, spec] : *p) spec.preset = name;
    return p;
  }();
  return *presets;
}

using Setter = std::function<absl::Status(absl::string_view key, absl::string_view value, GroupSpec*)>;

absl::Status SetRadius(absl::string_view key, absl::string_view value, GroupSpec* g) {
  if (value == "auto") {
    g->rule.radius_mode = RadiusMode::kAuto;
  } else if (value == "init") {
    g->rule.radius_mode = RadiusMode::kInit;
  } else if (value == "fan_in") {
    g->rule.radius_mode = RadiusMode::kFanIn;
  } else {
    double r;
    absl::Status s = ParseNumber(key, value, 0.0, true, kInf, true, &r);
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec key 'radius': bad value '", value, "' (auto, fan_in, init or a positive number)"));
    }
    g->rule.radius_mode = RadiusMode::kValue;
    g->rule.radius_value = r;
  }
  return absl::OkStatus();
}

// Key -> how to set it, in canonical order.
const std::vector<std::pair<std::string, Setter>>& Keys() {
  static const auto* keys = new std::vector<std::pair<std::string, Setter>>{
      {"base", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kBases, k, v, &g->rule.base); }},
      {"sphere", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kSpheres, k, v, &g->rule.sphere); }},
      {"radius", SetRadius},
      {"gains", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kGains, k, v, &g->rule.gains); }},
      {"gain_param", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kGainParams, k, v, &g->rule.gain_param); }},
      {"lr", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, false, kInf, true, &g->rule.lr); }},
      {"gain_lr", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, false, kInf, true, &g->rule.gain_lr); }},
      {"beta1", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, false, 1, true, &g->rule.beta1); }},
      {"beta2", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, false, 1, true, &g->rule.beta2); }},
      {"eps", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, true, kInf, true, &g->rule.eps); }},
      {"momentum", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, false, 1, true, &g->rule.momentum); }},
      {"nesterov", [](auto k, auto v, GroupSpec* g) { return ParseBool(k, v, &g->rule.nesterov); }},
      {"ns_steps",
       [](absl::string_view k, absl::string_view v, GroupSpec* g) {
         int n;
         if (!absl::SimpleAtoi(v, &n) || n < 1 || n > 100) {
           return absl::InvalidArgumentError(
               absl::StrCat("spec key '", k, "': bad value '", v, "' (an integer in [1, 100])"));
         }
         g->rule.ns_steps = n;
         return absl::OkStatus();
       }},
      {"ns_coeffs", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kNsSets, k, v, &g->rule.ns_coeffs); }},
      {"muon_scale", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kMuonScales, k, v, &g->rule.muon_scale); }},
      {"weight_decay", [](auto k, auto v, GroupSpec* g) { return ParseNumber(k, v, 0, false, kInf, true, &g->rule.weight_decay); }},
      {"tangent", [](auto k, auto v, GroupSpec* g) { return ParseBool(k, v, &g->rule.tangent); }},
      {"preserve_init", [](auto k, auto v, GroupSpec* g) { return ParseBool(k, v, &g->preserve_init); }},
      {"layout", [](auto k, auto v, GroupSpec* g) { return ParseEnum(kLayouts, k, v, &g->layout); }},
      {"blocks",
       [](absl::string_view k, absl::string_view v, GroupSpec* g) {
         // "none", "rows:K" (K in [1, 65536]) or "groups:G:h0,h1,..." (G in [1, 2^20], 1 to
         // kMaxRowPieces pieces of 1 to 2^31 rows each).
         g->block_groups = 0;
         g->block_heights.clear();
         if (v == "none") {
           g->row_blocks = 1;
           return absl::OkStatus();
         }
         const auto bad = [&] {
           return absl::InvalidArgumentError(absl::StrCat(
               "spec key '", k, "': bad value '", v,
               "' (none; rows:K with K in [1, 65536]: K row blocks of equal height; or "
               "groups:G:h0,h1,... with G in [1, 1048576] and 1 to ", kernels::kMaxRowPieces,
               " heights in [1, 2147483648]: G groups of pieces of h0, h1, ... rows, block j "
               "piece j of every group)"));
         };
         int64_t n = 0;
         if (absl::StartsWith(v, "rows:")) {
           if (!absl::SimpleAtoi(v.substr(5), &n) || n < 1 || n > 65536) return bad();
           g->row_blocks = n;
           return absl::OkStatus();
         }
         if (!absl::StartsWith(v, "groups:")) return bad();
         const std::vector<absl::string_view> parts = absl::StrSplit(v.substr(7), ':');
         if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &n) || n < 1 || n > (1 << 20))
           return bad();
         std::vector<int64_t> heights;
         for (absl::string_view h : absl::StrSplit(parts[1], ',')) {
           int64_t x = 0;
           if (!absl::SimpleAtoi(h, &x) || x < 1 || x > (int64_t{1} << 31)) return bad();
           heights.push_back(x);
         }
         if (heights.empty() || heights.size() > static_cast<size_t>(kernels::kMaxRowPieces))
           return bad();
         g->block_groups = n;
         g->block_heights = std::move(heights);
         g->row_blocks = static_cast<int64_t>(g->block_heights.size());
         return absl::OkStatus();
       }},
  };
  return *keys;
}

const Setter* FindKey(absl::string_view key) {
  for (const auto& [name, setter] : Keys())
    if (name == key) return &setter;
  return nullptr;
}

absl::Status Contradiction(absl::string_view key, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("spec key '", key, "': ", why));
}

// Keys that name a feature the final rule does not have.
absl::Status CheckConsistency(const GroupSpec& g, const std::set<std::string>& given) {
  const UpdateRule& r = g.rule;
  if (r.weight_decay > 0 && r.sphere != Sphere::kNone) {
    return Contradiction("weight_decay", absl::StrCat("weight decay together with sphere=",
                                                      ToString(r.sphere),
                                                      " is an error: the sphere fixes the norm"));
  }
  if (r.base == Base::kAdamW) {
    for (const char* k : {"momentum", "nesterov", "ns_steps", "ns_coeffs", "muon_scale"})
      if (given.count(k)) return Contradiction(k, "applies to base=muon only, this group has base=adamw");
  }
  if (r.base == Base::kMuon && r.ns_coeffs == NsCoeffSet::kQuintic &&
      r.ns_steps % kernels::kQuinticSetSize != 0) {
    return Contradiction(
        "ns_steps", absl::StrCat(r.ns_steps, " with ns_coeffs=quintic: the set of ",
                                 kernels::kQuinticSetSize,
                                 " tuples is cycled whole, so ns_steps must be a multiple of ",
                                 kernels::kQuinticSetSize, " (ns_coeffs=quintic_hold repeats the "
                                 "last tuple and takes any count)"));
  }
  if (r.gains == Gains::kNone) {
    for (const char* k : {"gain_lr", "gain_param"})
      if (given.count(k)) return Contradiction(k, "has no effect with gains=none");
  }
  if (g.preserve_init && r.sphere != Sphere::kNone &&
      kernels::PreserveInitTarget(r.sphere, r.gains) == kernels::AbsorbInto::kNone) {
    return Contradiction(
        "preserve_init",
        absl::StrCat("preserve_init=1 keeps the initial weights by putting each sphere slice's "
                     "norm into the gains, and sphere=", ToString(r.sphere), " with gains=",
                     ToString(r.gains), " has no gains along that axis (use gains=",
                     r.sphere == Sphere::kCol ? "col or rowcol" : r.sphere == Sphere::kRow ? "row or rowcol" : "scalar, row, col or rowcol",
                     ", or radius=init, which keeps the norms as the radii)"));
  }
  // blocks=rows:K shares the column and scalar gains over the K blocks, so they cannot hold
  // a factor of each block's own norm; row gains can (each block's rows are its own).
  if (g.preserve_init && g.row_blocks > 1 && r.sphere != Sphere::kNone) {
    const kernels::AbsorbInto into = kernels::PreserveInitTarget(r.sphere, r.gains);
    if (into == kernels::AbsorbInto::kCol || into == kernels::AbsorbInto::kScalar) {
      return Contradiction(
          "blocks",
          absl::StrCat("blocks=", BlocksText(g), " with preserve_init=1 needs the initial "
                       "norms in the row gains (each block's rows are its own), but sphere=",
                       ToString(r.sphere), " with gains=", ToString(r.gains), " puts them into the ",
                       into == kernels::AbsorbInto::kCol ? "column gains" : "scalar gain",
                       ", which the blocks share (use gains=row or rowcol with sphere=frobenius "
                       "or row, or radius=init without preserve_init)"));
    }
  }
  if (r.sphere == Sphere::kNone) {
    if (given.count("radius")) return Contradiction("radius", "has no effect with sphere=none");
    if (r.tangent) return Contradiction("tangent", "tangent=1 needs a sphere (sphere=none given)");
  }
  return absl::OkStatus();
}

std::string FormatNumber(double v) { return absl::StrFormat("%.17g", v); }

}  // namespace

const char* ToString(Base v) { return NameOf(kBases, v); }
const char* ToString(Sphere v) { return NameOf(kSpheres, v); }
const char* ToString(Gains v) { return NameOf(kGains, v); }
const char* ToString(GainParam v) { return NameOf(kGainParams, v); }
const char* ToString(MuonScale v) { return NameOf(kMuonScales, v); }
const char* ToString(NsCoeffSet v) { return NameOf(kNsSets, v); }
const char* ToString(Layout v) { return NameOf(kLayouts, v); }

Layout DefaultLayout(const UpdateRule& rule) {
  if (rule.base == Base::kAdamW || rule.sphere == Sphere::kRow) return Layout::kRows;
  return Layout::kOwner;
}

Layout ResolvedLayout(const GroupSpec& spec) {
  return spec.layout == Layout::kAuto ? DefaultLayout(spec.rule) : spec.layout;
}

const std::vector<std::string>& PresetNames() {
  static const auto* names = [] {
    auto* n = new std::vector<std::string>();
    for (const auto& [name, spec] : Presets()) n->push_back(name);
    return n;
  }();
  return *names;
}

absl::StatusOr<GroupSpec> ParseGroupSpec(absl::string_view spec) {
  absl::StatusOr<std::vector<KeyValue>> tokens = SplitKeyValues(spec, "spec");
  if (!tokens.ok()) return tokens.status();
  std::vector<KeyValue> pairs;
  std::set<std::string> given;
  std::string preset;
  for (const KeyValue& kv : *tokens) {
    given.emplace(kv.key);
    if (kv.key == "preset") {
      preset = std::string(kv.value);
      continue;
    }
    if (FindKey(kv.key) == nullptr) {
      std::vector<std::string> known = {"preset"};
      for (const auto& [name, setter] : Keys()) known.push_back(name);
      return absl::InvalidArgumentError(absl::StrCat("spec key '", kv.key, "' is unknown (known: ",
                                                     absl::StrJoin(known, ", "), ")"));
    }
    pairs.push_back(kv);
  }
  if (preset.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("spec key 'preset' is required (one of ",
                                                   absl::StrJoin(PresetNames(), ", "), ")"));
  }
  auto it = Presets().find(preset);
  if (it == Presets().end()) {
    return absl::InvalidArgumentError(absl::StrCat("spec key 'preset': unknown preset '", preset,
                                                   "' (one of ", absl::StrJoin(PresetNames(), ", "),
                                                   ")"));
  }
  GroupSpec g = it->second;
  for (const KeyValue& kv : pairs) {
    absl::Status s = (*FindKey(kv.key))(kv.key, kv.value, &g);
    if (!s.ok()) return s;
  }
  absl::Status s = CheckConsistency(g, given);
  if (!s.ok()) return s;
  return g;
}

absl::Status SetSpecNumber(GroupSpec* g, absl::string_view key, double value) {
  static const char* const kSettable[] = {"beta1", "beta2", "eps", "momentum", "weight_decay"};
  bool settable = false;
  for (const char* k : kSettable) settable = settable || key == k;
  if (!settable) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", key, "' cannot change after mdopt_add_group (settable: beta1, beta2, eps, "
        "momentum, weight_decay; lr through mdopt_set_group_lr)"));
  }
  if (!std::isfinite(value)) {
    return absl::InvalidArgumentError(absl::StrCat("spec key '", key, "': ", value, " is not a finite number"));
  }
  GroupSpec copy = *g;
  if (absl::Status s = (*FindKey(key))(key, FormatNumber(value), &copy); !s.ok()) return s;
  if (absl::Status s = CheckConsistency(copy, {std::string(key)}); !s.ok()) return s;
  *g = std::move(copy);
  return absl::OkStatus();
}

std::string BlocksText(const GroupSpec& g) {
  if (g.block_groups > 0)
    return absl::StrCat("groups:", g.block_groups, ":", absl::StrJoin(g.block_heights, ","));
  return g.row_blocks > 1 ? absl::StrCat("rows:", g.row_blocks) : "none";
}

std::string CanonicalSpec(const GroupSpec& g) {
  const UpdateRule& r = g.rule;
  std::string out = absl::StrCat("preset=", g.preset, " base=", ToString(r.base),
                                 " sphere=", ToString(r.sphere), " gains=", ToString(r.gains),
                                 " lr=", FormatNumber(r.lr), " beta1=", FormatNumber(r.beta1),
                                 " beta2=", FormatNumber(r.beta2), " eps=", FormatNumber(r.eps),
                                 " weight_decay=", FormatNumber(r.weight_decay),
                                 " preserve_init=", g.preserve_init ? 1 : 0,
                                 " layout=", ToString(g.layout));
  if (g.block_groups > 0) {
    absl::StrAppend(&out, " blocks=", BlocksText(g));
  } else if (g.row_blocks > 1) {
    absl::StrAppend(&out, " blocks=rows:", g.row_blocks);
  }
  if (r.sphere != Sphere::kNone) {
    const std::string radius = r.radius_mode == RadiusMode::kAuto    ? "auto"
                               : r.radius_mode == RadiusMode::kInit  ? "init"
                               : r.radius_mode == RadiusMode::kFanIn ? "fan_in"
                                                                     : FormatNumber(r.radius_value);
    absl::StrAppend(&out, " radius=", radius, " tangent=", r.tangent ? 1 : 0);
  }
  if (r.gains != Gains::kNone) {
    absl::StrAppend(&out, " gain_param=", ToString(r.gain_param),
                    " gain_lr=", FormatNumber(r.gain_lr));
  }
  if (r.base == Base::kMuon) {
    absl::StrAppend(&out, " momentum=", FormatNumber(r.momentum), " nesterov=", r.nesterov ? 1 : 0,
                    " ns_steps=", r.ns_steps, " ns_coeffs=", ToString(r.ns_coeffs),
                    " muon_scale=", ToString(r.muon_scale));
  }
  return out;
}

}  // namespace mdopt
