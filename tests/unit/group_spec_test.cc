// ParseGroupSpec and CanonicalSpec (dist_opt/group_spec.h): every preset against the table
// of DESIGN.md section 4, every key overridden on every preset (or refused as a
// contradiction, naming the key), parse(canonical(x)) == x, and a fuzz test of the parser
// with a fixed seed: it must never crash and must answer OK or InvalidArgument with a
// message in one of its two documented forms.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "dist_opt/group_spec.h"

namespace mdopt {
namespace {

using kernels::Base;
using kernels::GainParam;
using kernels::Gains;
using kernels::MuonScale;
using kernels::NsCoeffSet;
using kernels::RadiusMode;
using kernels::Sphere;

// Every field, so that a round trip or an override cannot change one unnoticed.
void ExpectSameSpec(const GroupSpec& a, const GroupSpec& b, const std::string& context) {
  SCOPED_TRACE(context);
  EXPECT_EQ(a.preset, b.preset);
  EXPECT_EQ(a.preserve_init, b.preserve_init);
  EXPECT_EQ(a.layout, b.layout);
  const kernels::UpdateRule &x = a.rule, &y = b.rule;
  EXPECT_EQ(x.base, y.base);
  EXPECT_EQ(x.sphere, y.sphere);
  EXPECT_EQ(x.radius_mode, y.radius_mode);
  EXPECT_EQ(x.radius_value, y.radius_value);
  EXPECT_EQ(x.gains, y.gains);
  EXPECT_EQ(x.gain_param, y.gain_param);
  EXPECT_EQ(x.lr, y.lr);
  EXPECT_EQ(x.gain_lr, y.gain_lr);
  EXPECT_EQ(x.beta1, y.beta1);
  EXPECT_EQ(x.beta2, y.beta2);
  EXPECT_EQ(x.eps, y.eps);
  EXPECT_EQ(x.momentum, y.momentum);
  EXPECT_EQ(x.nesterov, y.nesterov);
  EXPECT_EQ(x.ns_steps, y.ns_steps);
  EXPECT_EQ(x.ns_coeffs, y.ns_coeffs);
  EXPECT_EQ(x.muon_scale, y.muon_scale);
  EXPECT_EQ(x.weight_decay, y.weight_decay);
  EXPECT_EQ(x.tangent, y.tangent);
}

GroupSpec MustParse(const std::string& spec) {
  absl::StatusOr<GroupSpec> g = ParseGroupSpec(spec);
  EXPECT_TRUE(g.ok()) << spec << ": " << g.status();
  return g.ok() ? *g : GroupSpec{};
}

// parse(canonical(x)) == x, and the canonical form is a fixed point.
void ExpectRoundTrip(const GroupSpec& g, const std::string& origin) {
  const std::string canonical = CanonicalSpec(g);
  absl::StatusOr<GroupSpec> back = ParseGroupSpec(canonical);
  ASSERT_TRUE(back.ok()) << origin << " -> " << canonical << ": " << back.status();
  ExpectSameSpec(*back, g, absl::StrCat(origin, " -> ", canonical));
  EXPECT_EQ(CanonicalSpec(*back), canonical) << origin;
}

void ExpectRefused(const std::string& spec, const std::string& key) {
  absl::StatusOr<GroupSpec> g = ParseGroupSpec(spec);
  ASSERT_FALSE(g.ok()) << spec << " was accepted";
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << spec;
  EXPECT_NE(g.status().message().find(absl::StrCat("spec key '", key, "'")), absl::string_view::npos)
      << spec << ": message '" << g.status().message() << "' does not name '" << key << "'";
}

// --- the preset table --------------------------------------------------------------------

// DESIGN.md section 4, one row per preset; "-" cells are the features the preset lacks.
struct PresetRow {
  const char* name;
  Base base;
  Sphere sphere;
  const char* radius;  // "auto", a number, or nullptr for "-"
  Gains gains;
  double lr;
  double gain_lr;        // < 0 for "-"
  double weight_decay;
  const char* muon_scale;  // nullptr for "-"
};

const std::vector<PresetRow>& Table() {
  static const auto* rows = new std::vector<PresetRow>{
      {"md-muon", Base::kMuon, Sphere::kFrobenius, "auto", Gains::kRowCol, 8e-3, 1e-3, 0, "ratio"},
      {"md-adamw", Base::kAdamW, Sphere::kFrobenius, "auto", Gains::kRowCol, 1e-3, 1e-3, 0, nullptr},
      {"muon", Base::kMuon, Sphere::kNone, nullptr, Gains::kNone, 2e-2, -1, 0.1, "max1"},
      {"adamw", Base::kAdamW, Sphere::kNone, nullptr, Gains::kNone, 1e-3, -1, 0.1, nullptr},
      {"muonh", Base::kMuon, Sphere::kFrobenius, "auto", Gains::kNone, 8e-3, -1, 0, "ratio"},
      {"router", Base::kMuon, Sphere::kRow, "auto", Gains::kRowCol, 8e-3, 1e-3, 0, "none"},
      {"adamh", Base::kAdamW, Sphere::kFrobenius, "auto", Gains::kNone, 1e-3, -1, 0, nullptr},
      {"embedding", Base::kAdamW, Sphere::kRow, "1", Gains::kNone, 3e-3, -1, 0, nullptr},
      {"vector", Base::kAdamW, Sphere::kNone, nullptr, Gains::kNone, 1e-3, -1, 0, nullptr},
  };
  return *rows;
}

TEST(GroupSpecPresets, NamesAreExactlyTheTable) {
  std::set<std::string> want, got(PresetNames().begin(), PresetNames().end());
  for (const PresetRow& r : Table()) want.insert(r.name);
  EXPECT_EQ(got, want);
  EXPECT_EQ(PresetNames().size(), Table().size()) << "a preset name is listed twice";
}

TEST(GroupSpecPresets, MatchTheDesignTable) {
  for (const PresetRow& row : Table()) {
    SCOPED_TRACE(row.name);
    const GroupSpec g = MustParse(absl::StrCat("preset=", row.name));
    const kernels::UpdateRule& r = g.rule;
    EXPECT_EQ(g.preset, row.name);
    EXPECT_EQ(r.base, row.base);
    EXPECT_EQ(r.sphere, row.sphere);
    if (row.radius != nullptr && std::string(row.radius) == "auto") {
      EXPECT_EQ(r.radius_mode, RadiusMode::kAuto);
    } else if (row.radius != nullptr) {
      EXPECT_EQ(r.radius_mode, RadiusMode::kValue);
      EXPECT_EQ(r.radius_value, std::stod(row.radius));
    }
    EXPECT_EQ(r.gains, row.gains);
    EXPECT_EQ(r.lr, row.lr);
    if (row.gain_lr >= 0) {
      EXPECT_EQ(r.gain_lr, row.gain_lr);
    }
    EXPECT_EQ(r.weight_decay, row.weight_decay);
    if (row.muon_scale != nullptr) {
      EXPECT_STREQ(ToString(r.muon_scale), row.muon_scale);
    }
    // The defaults every preset shares (the sentence above the table).
    EXPECT_EQ(r.beta1, 0.9);
    EXPECT_EQ(r.beta2, 0.95);
    EXPECT_EQ(r.eps, 1e-8);
    EXPECT_EQ(r.momentum, 0.95);
    EXPECT_TRUE(r.nesterov);
    EXPECT_EQ(r.ns_steps, 5);
    EXPECT_EQ(r.ns_coeffs, NsCoeffSet::kQuintic);
    EXPECT_EQ(r.gain_param, GainParam::kSoftplus);
    EXPECT_FALSE(r.tangent);
    EXPECT_FALSE(g.preserve_init);
  }
}

// The preset name alone, and with the default values spelled out, are the same spec.
TEST(GroupSpecPresets, SpellingOutDefaultsChangesNothing) {
  for (const std::string& name : PresetNames()) {
    const GroupSpec bare = MustParse("preset=" + name);
    const std::string canonical = CanonicalSpec(bare);
    EXPECT_EQ(canonical.rfind("preset=" + name + " ", 0), 0u) << canonical;
    ExpectSameSpec(MustParse(canonical), bare, canonical);
    // Order of tokens and runs of whitespace do not matter.
    ExpectSameSpec(MustParse("\t base=" + std::string(ToString(bare.rule.base)) + "  \n preset=" +
                             name + "\r"),
                   bare, name + " reordered");
  }
}

// DESIGN.md section 1, step 7: the gains' Adam uses gain_lr, "default 1e-3". A preset
// without gains leaves gain_lr at 0, so turning gains on over it freezes them silently
// (fast_vs_reference_test's "preset=adamw gains=row" runs with gain_lr = 0). Disabled until
// dist_opt/group_spec.cc gives gainless presets the documented default.
TEST(GroupSpecPresets, GainsTurnedOnOverAGainlessPresetGetTheDefaultGainLr) {
  for (const char* preset : {"muon", "adamw", "muonh", "adamh", "embedding", "vector"}) {
    const GroupSpec g = MustParse(absl::StrCat("preset=", preset, " gains=rowcol"));
    EXPECT_EQ(g.rule.gain_lr, 1e-3) << preset;
  }
  // muonh with rowcol gains is md-muon by the table's own rows.
  GroupSpec muonh = MustParse("preset=muonh gains=rowcol");
  muonh.preset = "md-muon";
  ExpectSameSpec(muonh, MustParse("preset=md-muon"), "muonh gains=rowcol vs md-muon");
}

// --- every key, overridden on every preset ------------------------------------------------

// One key: a value that no preset has, what it does to the spec, and when it contradicts the
// preset (then the key named in the error).
struct Override {
  const char* key;
  std::function<std::string(const GroupSpec&)> value;
  std::function<void(GroupSpec*)> apply;
  std::function<const char*(const GroupSpec&)> refused_by;  // nullptr result: accepted
};

const std::vector<Override>& Overrides() {
  auto never = [](const GroupSpec&) -> const char* { return nullptr; };
  auto if_adamw = [](const char* key) {
    return [key](const GroupSpec& g) -> const char* { return g.rule.base == Base::kAdamW ? key : nullptr; };
  };
  auto if_no_gains = [](const char* key) {
    return [key](const GroupSpec& g) -> const char* { return g.rule.gains == Gains::kNone ? key : nullptr; };
  };
  auto fixed = [](const char* v) { return [v](const GroupSpec&) { return std::string(v); }; };
  static const auto* o = new std::vector<Override>{
      {"base",
       [](const GroupSpec& g) { return std::string(g.rule.base == Base::kMuon ? "adamw" : "muon"); },
       [](GroupSpec* g) { g->rule.base = g->rule.base == Base::kMuon ? Base::kAdamW : Base::kMuon; },
       never},
      // No preset uses column spheres; the decayed presets refuse any sphere.
      {"sphere", fixed("col"), [](GroupSpec* g) { g->rule.sphere = Sphere::kCol; },
       [](const GroupSpec& g) -> const char* { return g.rule.weight_decay > 0 ? "weight_decay" : nullptr; }},
      {"radius", fixed("2.5"),
       [](GroupSpec* g) {
         g->rule.radius_mode = RadiusMode::kValue;
         g->rule.radius_value = 2.5;
       },
       [](const GroupSpec& g) -> const char* { return g.rule.sphere == Sphere::kNone ? "radius" : nullptr; }},
      {"gains", fixed("scalar"), [](GroupSpec* g) { g->rule.gains = Gains::kScalar; }, never},
      {"gain_param", fixed("exp"), [](GroupSpec* g) { g->rule.gain_param = GainParam::kExp; },
       if_no_gains("gain_param")},
      {"lr", fixed("0.125"), [](GroupSpec* g) { g->rule.lr = 0.125; }, never},
      {"gain_lr", fixed("0.25"), [](GroupSpec* g) { g->rule.gain_lr = 0.25; }, if_no_gains("gain_lr")},
      {"beta1", fixed("0.5"), [](GroupSpec* g) { g->rule.beta1 = 0.5; }, never},
      {"beta2", fixed("0.75"), [](GroupSpec* g) { g->rule.beta2 = 0.75; }, never},
      {"eps", fixed("1e-6"), [](GroupSpec* g) { g->rule.eps = 1e-6; }, never},
      {"momentum", fixed("0.5"), [](GroupSpec* g) { g->rule.momentum = 0.5; }, if_adamw("momentum")},
      {"nesterov", fixed("0"), [](GroupSpec* g) { g->rule.nesterov = false; }, if_adamw("nesterov")},
      {"ns_steps", fixed("10"), [](GroupSpec* g) { g->rule.ns_steps = 10; }, if_adamw("ns_steps")},
      {"ns_coeffs", fixed("jordan"), [](GroupSpec* g) { g->rule.ns_coeffs = NsCoeffSet::kJordan; },
       if_adamw("ns_coeffs")},
      {"muon_scale", fixed("rms"), [](GroupSpec* g) { g->rule.muon_scale = MuonScale::kRms; },
       if_adamw("muon_scale")},
      {"weight_decay", fixed("0.01"), [](GroupSpec* g) { g->rule.weight_decay = 0.01; },
       [](const GroupSpec& g) -> const char* { return g.rule.sphere != Sphere::kNone ? "weight_decay" : nullptr; }},
      {"tangent", fixed("1"), [](GroupSpec* g) { g->rule.tangent = true; },
       [](const GroupSpec& g) -> const char* { return g.rule.sphere == Sphere::kNone ? "tangent" : nullptr; }},
      {"preserve_init", fixed("1"), [](GroupSpec* g) { g->preserve_init = true; },
       // The initial norm goes into the gains: a sphere without gains cannot hold it.
       [](const GroupSpec& g) -> const char* {
         return g.rule.sphere != Sphere::kNone && g.rule.gains == Gains::kNone ? "preserve_init" : nullptr;
       }},
      {"layout", fixed("rows"), [](GroupSpec* g) { g->layout = Layout::kRows; }, never},
  };
  return *o;
}

TEST(GroupSpecOverrides, EveryDocumentedKeyIsCovered) {
  // DESIGN.md section 4's list of overrides.
  const std::set<std::string> documented = {
      "base", "sphere", "radius", "gains", "gain_param", "lr", "gain_lr", "beta1", "beta2", "eps",
      "momentum", "nesterov", "ns_steps", "ns_coeffs", "muon_scale", "weight_decay", "tangent",
      "preserve_init", "layout"};
  std::set<std::string> covered;
  for (const Override& o : Overrides()) covered.insert(o.key);
  EXPECT_EQ(covered, documented);
}

TEST(GroupSpecOverrides, EveryKeyOnEveryPreset) {
  int accepted = 0, refused = 0;
  for (const std::string& preset : PresetNames()) {
    const GroupSpec base = MustParse("preset=" + preset);
    for (const Override& o : Overrides()) {
      const std::string spec = absl::StrCat("preset=", preset, " ", o.key, "=", o.value(base));
      SCOPED_TRACE(spec);
      if (const char* key = o.refused_by(base)) {
        ExpectRefused(spec, key);
        ++refused;
        continue;
      }
      GroupSpec want = base;
      o.apply(&want);
      const GroupSpec got = MustParse(spec);
      // What gain_lr becomes when gains are turned on over a gainless preset is the subject
      // of the disabled test above; this test does not pin it either way.
      if (std::string(o.key) == "gains" && base.rule.gains == Gains::kNone) {
        want.rule.gain_lr = got.rule.gain_lr;
      }
      ExpectSameSpec(got, want, spec);
      ExpectRoundTrip(got, spec);
      ++accepted;
    }
  }
  // Both branches must have been exercised on the table as it stands.
  EXPECT_GT(accepted, 100);
  EXPECT_GT(refused, 20);
}

// Values at and beyond each key's bounds: the boundary that is allowed parses, the one
// outside is refused naming the key.
TEST(GroupSpecOverrides, BoundsAndSpellings) {
  struct Case {
    const char* spec;
    bool ok;
    const char* key;
  };
  const Case cases[] = {
      {"preset=md-muon lr=0", true, "lr"},
      {"preset=md-muon lr=-1e-3", false, "lr"},
      {"preset=md-muon lr=inf", false, "lr"},
      {"preset=md-muon lr=nan", false, "lr"},
      {"preset=md-muon lr=1e999", false, "lr"},
      {"preset=md-muon lr=abc", false, "lr"},
      {"preset=md-muon lr=1e-2x", false, "lr"},
      {"preset=md-muon gain_lr=0", true, "gain_lr"},
      {"preset=md-muon gain_lr=-0.5", false, "gain_lr"},
      {"preset=md-muon beta1=0", true, "beta1"},
      {"preset=md-muon beta1=1", false, "beta1"},
      {"preset=md-muon beta2=0.999999", true, "beta2"},
      {"preset=md-muon beta2=1.5", false, "beta2"},
      {"preset=md-muon eps=0", false, "eps"},
      {"preset=md-muon eps=1e-30", true, "eps"},
      {"preset=md-muon momentum=0", true, "momentum"},
      {"preset=md-muon momentum=1", false, "momentum"},
      {"preset=md-muon nesterov=true", true, "nesterov"},
      {"preset=md-muon nesterov=false", true, "nesterov"},
      {"preset=md-muon nesterov=yes", false, "nesterov"},
      {"preset=md-muon nesterov=2", false, "nesterov"},
      {"preset=md-muon ns_coeffs=quintic_hold ns_steps=1", true, "ns_steps"},
      {"preset=md-muon ns_steps=1", false, "ns_steps"},
      {"preset=md-muon ns_steps=100", true, "ns_steps"},
      {"preset=md-muon ns_steps=7", false, "ns_steps"},
      {"preset=md-muon ns_coeffs=quintic_hold", true, "ns_coeffs"},
      {"preset=md-muon ns_steps=0", false, "ns_steps"},
      {"preset=md-muon ns_steps=101", false, "ns_steps"},
      {"preset=md-muon ns_steps=2.5", false, "ns_steps"},
      {"preset=md-muon ns_coeffs=polar_express", true, "ns_coeffs"},
      {"preset=md-muon ns_coeffs=newton", false, "ns_coeffs"},
      {"preset=md-muon muon_scale=max1", true, "muon_scale"},
      {"preset=md-muon muon_scale=huge", false, "muon_scale"},
      {"preset=md-muon base=sgd", false, "base"},
      {"preset=md-muon sphere=ball", false, "sphere"},
      {"preset=md-muon sphere=none", true, "sphere"},
      {"preset=md-muon radius=init", true, "radius"},
      {"preset=md-muon radius=auto", true, "radius"},
      {"preset=md-muon radius=0", false, "radius"},
      {"preset=md-muon radius=-2", false, "radius"},
      {"preset=md-muon radius=inf", false, "radius"},
      {"preset=md-muon radius=big", false, "radius"},
      {"preset=md-muon gains=diag", false, "gains"},
      {"preset=md-muon gain_param=direct", true, "gain_param"},
      {"preset=md-muon gain_param=relu", false, "gain_param"},
      {"preset=muon weight_decay=0", true, "weight_decay"},
      {"preset=muon weight_decay=-0.1", false, "weight_decay"},
      {"preset=md-muon weight_decay=0", true, "weight_decay"},
      {"preset=md-muon tangent=0", true, "tangent"},
      {"preset=md-muon tangent=on", false, "tangent"},
      {"preset=vector tangent=0", true, "tangent"},
      {"preset=md-muon preserve_init=true", true, "preserve_init"},
      {"preset=md-muon preserve_init=maybe", false, "preserve_init"},
      // Contradictions that only appear once several keys are combined.
      {"preset=md-muon sphere=none tangent=1", false, "tangent"},
      {"preset=md-muon sphere=none radius=2", false, "radius"},
      {"preset=md-muon gains=none gain_lr=0.1", false, "gain_lr"},
      {"preset=md-muon gains=none gain_param=exp", false, "gain_param"},
      {"preset=md-muon base=adamw ns_steps=3", false, "ns_steps"},
      {"preset=muon sphere=row", false, "weight_decay"},
      {"preset=muon sphere=row weight_decay=0", true, "sphere"},
      {"preset=adamw base=muon momentum=0.9", true, "momentum"},
      // The key named by a failure is the one at fault, whatever the order.
      {"lr=0.1 preset=md-muon lr=0.2", false, "lr"},
      {"preset=md-muon preset=muon", false, "preset"},
      {"preset=md-muon bogus=1", false, "bogus"},
      {"preset=md-muon LR=0.1", false, "LR"},
      {"lr=0.1", false, "preset"},
      {"", false, "preset"},
      {"preset=md-muonx", false, "preset"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.spec);
    if (c.ok) {
      ExpectRoundTrip(MustParse(c.spec), c.spec);
    } else {
      ExpectRefused(c.spec, c.key);
    }
  }
}

// Tokens that are not key=value at all get the "spec:" form.
TEST(GroupSpecOverrides, MalformedTokens) {
  for (const char* spec : {"preset=md-muon lr", "preset=md-muon =1", "preset=md-muon lr=",
                           "preset", "=", "preset=md-muon ="}) {
    absl::StatusOr<GroupSpec> g = ParseGroupSpec(spec);
    ASSERT_FALSE(g.ok()) << spec;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(g.status().message().find("spec: '"), absl::string_view::npos) << g.status();
    EXPECT_NE(g.status().message().find("key=value"), absl::string_view::npos) << g.status();
  }
}

// --- CanonicalSpec ----------------------------------------------------------------------

TEST(GroupSpecCanonical, RoundTripsEveryPresetAndManyOverrides) {
  for (const std::string& preset : PresetNames()) {
    ExpectRoundTrip(MustParse("preset=" + preset), preset);
  }
  for (const char* spec : {
           "preset=md-muon lr=0.1 gain_lr=3.3333333333333331e-05 beta1=0.123456789012345678",
           "preset=md-muon radius=0.70710678118654757 tangent=1 sphere=col",
           "preset=md-muon radius=init gains=scalar gain_param=direct",
           "preset=md-muon lr=4.9406564584124654e-324 eps=2.2250738585072014e-308",
           "preset=md-muon lr=1.7976931348623157e+308",
           "preset=md-adamw base=muon ns_coeffs=polar_express ns_steps=12 muon_scale=none",
           "preset=muon base=adamw",
           "preset=muon weight_decay=0.30000000000000004 nesterov=0 momentum=0.99",
           "preset=embedding sphere=none",
           "preset=embedding radius=auto",
           "preset=embedding sphere=col radius=3",
           "preset=router gains=col gain_param=exp gain_lr=0.5",
           "preset=vector preserve_init=1 beta2=0.999",
           "preset=adamh tangent=1 sphere=row gains=row preserve_init=true",
           "preset=md-muon lr=-0",
       }) {
    ExpectRoundTrip(MustParse(spec), spec);
  }
}

// Keys of features the rule lacks are left out (and so cannot contradict on the way back).
TEST(GroupSpecCanonical, LeavesOutKeysOfAbsentFeatures) {
  const std::string adamw = CanonicalSpec(MustParse("preset=adamw"));
  for (const char* key : {"radius=", "tangent=", "gain_lr=", "gain_param=", "momentum=",
                          "nesterov=", "ns_steps=", "ns_coeffs=", "muon_scale="}) {
    EXPECT_EQ(adamw.find(key), std::string::npos) << adamw << " has " << key;
  }
  const std::string md = CanonicalSpec(MustParse("preset=md-muon"));
  for (const char* key : {"preset=md-muon", "base=muon", "sphere=frobenius", "radius=auto",
                          "gains=rowcol", "gain_param=softplus", "lr=0.0080000000000000002",
                          "ns_coeffs=quintic", "muon_scale=ratio", "preserve_init=0"}) {
    EXPECT_NE(md.find(key), std::string::npos) << md << " lacks " << key;
  }
}

// --- fuzz -------------------------------------------------------------------------------

// Builds random specs from mutated tokens. Fixed seed: a failure reproduces exactly.
class SpecFuzzer {
 public:
  explicit SpecFuzzer(uint64_t seed) : rng_(seed) {}

  std::string Next() {
    std::string spec;
    if (Chance(0.75)) spec = "preset=" + Pick(Presets());
    const int tokens = Uniform(0, 6);
    for (int t = 0; t < tokens; ++t) {
      spec += Separator();
      spec += Token();
    }
    if (Chance(0.2)) spec += Separator();
    if (Chance(0.1)) spec = Separator() + spec;
    return spec;
  }

 private:
  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }
  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  template <typename T>
  const T& Pick(const std::vector<T>& v) {
    return v[static_cast<size_t>(Uniform(0, static_cast<int>(v.size()) - 1))];
  }

  static const std::vector<std::string>& Presets() {
    static const auto* p = [] {
      auto* v = new std::vector<std::string>(PresetNames());
      v->push_back("md-muon ");
      v->push_back("MD-MUON");
      v->push_back("");
      return v;
    }();
    return *p;
  }
  static const std::vector<std::string>& Keys() {
    static const auto* k = new std::vector<std::string>{
        "preset", "base", "sphere", "radius", "gains", "gain_param", "lr", "gain_lr", "beta1",
        "beta2", "eps", "momentum", "nesterov", "ns_steps", "ns_coeffs", "muon_scale",
        "weight_decay", "tangent", "preserve_init", "layout"};
    return *k;
  }
  static const std::vector<std::string>& GoodValues() {
    static const auto* v = new std::vector<std::string>{
        "muon", "adamw", "none", "frobenius", "row", "col", "auto", "init", "scalar", "rowcol",
        "rows", "owner",
        "softplus", "direct", "exp", "quintic", "jordan", "polar_express", "ratio", "max1",
        "rms", "0", "1", "true", "false", "0.5", "1e-3", "8e-3", "0.95", "2.5", "7", "100"};
    return *v;
  }
  static const std::vector<std::string>& JunkValues() {
    static const auto* v = new std::vector<std::string>{
        "", "nan", "NaN", "inf", "-inf", "-1", "1e999", "-0", "0x10", "1e-400", "abc", "1,5",
        "+3", "  ", "=", "==", "a=b", "\xff\xfe", "\xc3\xa9t\xc3\xa9", "\x01\x02", "1e", ".",
        "9223372036854775808", "-9223372036854775809", "0.99999999999999999999", "TRUE"};
    return *v;
  }

  std::string Separator() {
    static const char* seps[] = {" ", "  ", "\t", "\n", "\r", " \t\r\n "};
    return seps[Uniform(0, 5)];
  }

  std::string Mutate(std::string s) {
    switch (Uniform(0, 9)) {
      case 0:  // a random byte somewhere, often non-ASCII or a control character
        s.insert(s.begin() + Uniform(0, static_cast<int>(s.size())), static_cast<char>(Uniform(0, 255)));
        break;
      case 1:  // drop a byte
        if (!s.empty()) s.erase(s.begin() + Uniform(0, static_cast<int>(s.size()) - 1));
        break;
      case 2:  // very long
        s += std::string(static_cast<size_t>(Uniform(1000, 20000)), "a0=.\x80"[Uniform(0, 4)]);
        break;
      case 3:  // '=' in an odd place
        s.insert(s.begin() + Uniform(0, static_cast<int>(s.size())), '=');
        break;
      case 4:  // a NUL byte inside the token (the parser takes a string_view)
        s.insert(s.begin() + Uniform(0, static_cast<int>(s.size())), '\0');
        break;
      default:
        break;
    }
    return s;
  }

  std::string Token() {
    // Tokens that switch a feature off, so that later keys meet the contradiction checks.
    static const std::vector<std::string> switches = {"sphere=none", "gains=none", "base=adamw",
                                                      "weight_decay=0.1", "tangent=1"};
    if (Chance(0.15)) return Pick(switches);
    const int kind = Uniform(0, 9);
    std::string key = kind < 8 ? Pick(Keys()) : Mutate(Pick(Keys()));
    if (Chance(0.02)) key.clear();
    std::string value = Chance(0.8) ? Pick(GoodValues()) : Pick(JunkValues());
    if (key == "preset" && Chance(0.7)) value = Pick(Presets());
    if (Chance(0.15)) value = Mutate(value);
    switch (Uniform(0, 39)) {
      case 0: return key;                      // no '='
      case 1: return key + "==" + value;       // doubled '='
      case 2: return "=" + key + "=" + value;  // leading '='
      case 3: return key + "=" + value + "=";  // trailing '='
      case 4: return "";                       // empty token
      default: return key + "=" + value;
    }
  }

  std::mt19937_64 rng_;
};

TEST(GroupSpecFuzz, NeverCrashesAndAlwaysExplains) {
  SpecFuzzer fuzz(20261127);
  constexpr int kSpecs = 5000;
  int ok = 0, refused = 0;
  for (int i = 0; i < kSpecs; ++i) {
    const std::string spec = fuzz.Next();
    absl::StatusOr<GroupSpec> g = ParseGroupSpec(spec);
    if (g.ok()) {
      ++ok;
      // Whatever is accepted must also survive the canonical form (checkpoints rely on it).
      ASSERT_NO_FATAL_FAILURE(ExpectRoundTrip(*g, spec)) << "spec #" << i;
      continue;
    }
    ++refused;
    ASSERT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument)
        << "spec #" << i << " '" << spec << "': " << g.status();
    const absl::string_view msg = g.status().message();
    ASSERT_TRUE(msg.find("spec key '") != absl::string_view::npos ||
                msg.find("spec:") != absl::string_view::npos)
        << "spec #" << i << " '" << spec << "': message '" << msg << "'";
  }
  // The generator must reach deep into the parser, not just fail on the first token.
  EXPECT_GT(ok, kSpecs / 20) << "accepted " << ok << " of " << kSpecs;
  EXPECT_GT(refused, kSpecs / 4) << "refused " << refused << " of " << kSpecs;
}

}  // namespace
}  // namespace mdopt
