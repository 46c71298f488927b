// Checkpoints (DESIGN.md section 5) through the C ABI:
//  (a) save at step 10, load into a freshly created optimizer, run 10 more steps: the result
//      is the uninterrupted 20-step run bit for bit (every mdopt_get_state field and the
//      model's tensors), and the step counter continues from 10;
//  (b) a torn, damaged, newer or mismatched checkpoint is refused with MDOPT_IO_ERROR and a
//      message naming the problem, and the refusing optimizer is untouched: its state and
//      tensors are bitwise those of a twin that never tried, and it keeps stepping like it;
//  (c) save is atomic: no temporary files are left, and saving again into the same
//      directory replaces the checkpoint.
// Every test works in its own mkdtemp directory, removed at the end. Every test's name
// starts with `checkpoint` (suite or instantiation prefix) for `ctest -R checkpoint`.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "dist_opt/crc32c.h"
#include "nlohmann/json.hpp"
#include "numeric_util.h"
#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::BitwiseEqual;
using testing::Snapshot;
using testing::Take;
using testing::TempDir;
using testing::TensorSpec;

constexpr char kManifest[] = "manifest.json";
// Rank files are named "rank-00000.<crc32c>.state" by content; messages name the file, so
// they contain this prefix.
constexpr char kRankFile[] = "rank-00000.";

// Steps a harness from step `from` + 1 to `to`, checking the counter the ABI reports.
void RunSteps(AbiHarness& h, uint64_t seed, int from, int to) {
  for (int step = from + 1; step <= to; ++step) {
    ASSERT_NO_FATAL_FAILURE(h.StepChecked(seed, step));
  }
}

// ---------------------------------------------------------------------------------------
// (a) Resume bit for bit.

struct Engine {
  const char* name;
  const char* options;
  mdopt_dtype param, grad;
};

const Engine kResumeEngines[] = {
    {"fast_f32", "kernels=fast", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
    {"fast_bf16", "kernels=fast", MDOPT_DTYPE_BF16, MDOPT_DTYPE_BF16},
    {"fast_bf16_f32grad", "kernels=fast", MDOPT_DTYPE_BF16, MDOPT_DTYPE_F32},
    {"reference_f32", "kernels=reference", MDOPT_DTYPE_F32, MDOPT_DTYPE_F32},
};

struct Preset {
  const char* spec;
  bool adam;  // 1-D tensors go only into Adam groups
};

const Preset kResumePresets[] = {{"preset=md-muon", false},
                                 {"preset=md-adamw", true},
                                 {"preset=muon", false},
                                 {"preset=adamw", true},
                                 {"preset=router", false},
                                 {"preset=embedding", true},
                                 {"preset=md-muon gains=scalar sphere=col radius=init", false},
                                 {"preset=md-muon gains=col preserve_init=1", false}};

std::vector<TensorSpec> ResumeTensors(const Preset& preset, const Engine& eng) {
  const mdopt_dtype p = eng.param, g = eng.grad;
  std::vector<TensorSpec> t = {{"wide", {7, 19}, p, g}, {"tall", {23, 6}, p, g},
                               {"row1", {1, 11}, p, g}, {"experts", {3, 5, 8}, p, g}};
  // Above the fast passes' threading threshold (2^15 elements): the multi-threaded
  // reductions must resume exactly too. Once per preset (f32 fast) keeps the suite quick.
  if (std::string(eng.name) == "fast_f32") t.push_back({"big", {41, 800}, p, g});
  if (preset.adam) t.push_back({"vec", {13}, p, g});
  return t;
}

class Resume : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(Resume, TenPlusTenEqualsTwenty) {
  const Preset& preset = kResumePresets[std::get<0>(GetParam())];
  const std::string spec = preset.spec;
  const Engine& eng = kResumeEngines[std::get<1>(GetParam())];
  SCOPED_TRACE(spec + " " + eng.name);
  const std::vector<TensorSpec> tensors = ResumeTensors(preset, eng);
  const uint64_t seed = 40 + std::get<0>(GetParam());
  TempDir tmp;
  const std::string dir = tmp.Sub("ckpt");

  AbiHarness straight(eng.options, spec, tensors, seed);
  MDOPT_ASSERT_OK(mdopt_finalize(straight.opt()));
  RunSteps(straight, seed, 0, 20);
  if (HasFatalFailure()) return;

  AbiHarness first(eng.options, spec, tensors, seed);
  MDOPT_ASSERT_OK(mdopt_finalize(first.opt()));
  RunSteps(first, seed, 0, 10);
  if (HasFatalFailure()) return;
  MDOPT_ASSERT_OK(mdopt_save(first.opt(), dir.c_str()));

  // A new process in effect: new optimizer, new buffers holding the initial weights.
  AbiHarness resumed(eng.options, spec, tensors, seed);
  MDOPT_ASSERT_OK(mdopt_finalize(resumed.opt()));
  ASSERT_FALSE(BitwiseEqual(Take(resumed), Take(first))) << "the first 10 steps changed nothing";
  MDOPT_ASSERT_OK(mdopt_load(resumed.opt(), dir.c_str()));
  ASSERT_TRUE(BitwiseEqual(Take(resumed), Take(first))) << "right after load";
  RunSteps(resumed, seed, 10, 20);  // asserts info.step = 11, ..., 20
  if (HasFatalFailure()) return;
  EXPECT_TRUE(BitwiseEqual(Take(resumed), Take(straight))) << "after 10 + 10 steps";
}

INSTANTIATE_TEST_SUITE_P(
    checkpoint, Resume,
    ::testing::Combine(::testing::Range(0, static_cast<int>(std::size(kResumePresets))),
                       ::testing::Range(0, static_cast<int>(std::size(kResumeEngines)))),
    [](const auto& info) {
      std::string s = kResumePresets[std::get<0>(info.param)].spec;
      for (char& c : s)
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      return s + "_" + kResumeEngines[std::get<1>(info.param)].name;
    });

// ---------------------------------------------------------------------------------------
// (b) Refusals.

// What the running optimizer is; a saver differs from it in at most one respect.
struct Config {
  std::string options = "kernels=fast";
  std::string spec = "preset=md-muon";
  std::vector<TensorSpec> tensors;
};

Config RunningConfig(int engine) {
  Config c;
  // bf16 weights under the fast engine: the model tensor is separate from the master, so
  // both must be seen untouched. The reference engine keeps float64 state.
  const mdopt_dtype p = engine == 0 ? MDOPT_DTYPE_BF16 : MDOPT_DTYPE_F32;
  c.options = engine == 0 ? "kernels=fast" : "kernels=reference";
  c.tensors = {{"wide", {7, 19}, p, MDOPT_DTYPE_F32},
               {"tall", {23, 6}, p, MDOPT_DTYPE_F32},
               {"experts", {3, 5, 8}, p, MDOPT_DTYPE_F32}};
  return c;
}

std::string Flip(std::string data, size_t pos, unsigned char bit = 0x01) {
  data[pos] = static_cast<char>(static_cast<unsigned char>(data[pos]) ^ bit);
  return data;
}

struct Refusal {
  std::string name;
  // Changes the saver's configuration (for mismatches); identity otherwise.
  std::function<void(Config*)> saver;
  // Damages the saved directory; returns the directory to load from.
  std::function<std::string(const std::string& dir)> damage;
  // Every one of these must appear in mdopt_last_error().
  std::vector<std::string> message;
};

std::string Identity(const std::string& dir) { return dir; }
void SameConfig(Config*) {}

std::vector<Refusal> Refusals() {
  auto rank = [](const std::string& dir) { return dir + "/" + testing::RankFileOf(dir); };
  auto manifest = [](const std::string& dir) { return dir + "/" + kManifest; };
  using testing::ReadBytes;
  using testing::WriteBytes;
  std::vector<Refusal> r;
  // Torn files.
  r.push_back({"rank_file_truncated_to_half", SameConfig,
               [=](const std::string& d) {
                 const std::string b = ReadBytes(rank(d));
                 WriteBytes(rank(d), b.substr(0, b.size() / 2));
                 return d;
               },
               {kRankFile, "truncated"}});
  r.push_back({"rank_file_short_by_one_byte", SameConfig,
               [=](const std::string& d) {
                 const std::string b = ReadBytes(rank(d));
                 WriteBytes(rank(d), b.substr(0, b.size() - 1));
                 return d;
               },
               {kRankFile, "truncated"}});
  r.push_back({"manifest_truncated_to_half", SameConfig,
               [=](const std::string& d) {
                 const std::string b = ReadBytes(manifest(d));
                 WriteBytes(manifest(d), b.substr(0, b.size() / 2));
                 return d;
               },
               {kManifest, "truncated"}});
  r.push_back({"manifest_missing_last_bytes", SameConfig,
               [=](const std::string& d) {
                 const std::string b = ReadBytes(manifest(d));
                 WriteBytes(manifest(d), b.substr(0, b.size() - 4));
                 return d;
               },
               {kManifest, "checksum"}});
  // Single flipped bits in the rank file: header (magic, then the version field), the
  // middle of the state arrays, and the last byte (the trailer checksum itself).
  for (const auto& [where, pos] : std::vector<std::pair<std::string, std::function<size_t(size_t)>>>{
           {"first_byte", [](size_t) { return size_t{0}; }},
           {"version_field", [](size_t) { return size_t{12}; }},
           {"middle", [](size_t n) { return n / 2; }},
           {"last_byte", [](size_t n) { return n - 1; }}}) {
    r.push_back({"rank_file_bit_flip_" + where, SameConfig,
                 [=](const std::string& d) {
                   const std::string b = ReadBytes(rank(d));
                   WriteBytes(rank(d), Flip(b, pos(b.size()), 0x10));
                   return d;
                 },
                 {kRankFile, "checksum"}});
  }
  // Flipped bits in the manifest: the step count (a plausible digit) and the middle.
  r.push_back({"manifest_bit_flip_step", SameConfig,
               [=](const std::string& d) {
                 const std::string b = ReadBytes(manifest(d));
                 const size_t at = b.find("\"step\": ");
                 EXPECT_NE(at, std::string::npos);
                 WriteBytes(manifest(d), Flip(b, at + 8, 0x01));  // '7' -> '6'
                 return d;
               },
               {kManifest, "checksum"}});
  r.push_back({"manifest_bit_flip_middle", SameConfig,
               [=](const std::string& d) {
                 const std::string b = ReadBytes(manifest(d));
                 WriteBytes(manifest(d), Flip(b, b.size() / 2, 0x02));
                 return d;
               },
               {kManifest, "checksum"}});
  // A newer format: the version must be named, not reported as damage.
  r.push_back({"manifest_format_version_3", SameConfig,
               [=](const std::string& d) {
                 std::string b = ReadBytes(manifest(d));
                 const size_t at = b.find("\"format_version\": 2");
                 EXPECT_NE(at, std::string::npos);
                 b.replace(at, std::strlen("\"format_version\": 2"), "\"format_version\": 3");
                 WriteBytes(manifest(d), b);
                 return d;
               },
               {"format version 3"}});
  // A format 1 checkpoint (manifest.txt): refused by its version, not as a missing file.
  r.push_back({"format_1_manifest_txt", SameConfig,
               [=](const std::string& d) {
                 std::filesystem::remove(manifest(d));
                 WriteBytes(d + "/manifest.txt", "mdopt-checkpoint-format 1\nengine fast\n");
                 return d;
               },
               {"format version 1", "manifest.txt"}});
  // Missing pieces.
  r.push_back({"rank_file_missing", SameConfig,
               [=](const std::string& d) {
                 std::filesystem::remove(rank(d));
                 return d;
               },
               {kRankFile}});
  r.push_back({"directory_missing", SameConfig,
               [](const std::string& d) { return d + "-does-not-exist"; },
               {"-does-not-exist"}});
  // Checkpoints of another optimizer.
  r.push_back({"different_param_shape",
               [](Config* c) { c->tensors[1].shape = {23, 7}; }, Identity,
               {"does not match", "tall"}});
  r.push_back({"different_group_base",
               [](Config* c) { c->spec = "preset=md-adamw"; }, Identity,
               {"does not match", "base=adamw"}});
  r.push_back({"different_param_name",
               [](Config* c) { c->tensors[1].name = "tall_renamed"; }, Identity,
               {"does not match", "tall_renamed"}});
  r.push_back({"different_kernels_engine",
               [](Config* c) {
                 c->options = c->options == "kernels=fast" ? "kernels=reference" : "kernels=fast";
               },
               Identity, {"does not match", "kernels="}});
  r.push_back({"different_param_count",
               [](Config* c) { c->tensors.pop_back(); }, Identity, {"does not match", "params"}});
  return r;
}

class Refuse : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(Refuse, LeavesStateUntouched) {
  const Refusal refusal = Refusals()[std::get<0>(GetParam())];
  const Config running = RunningConfig(std::get<1>(GetParam()));
  SCOPED_TRACE(refusal.name + " " + running.options);
  constexpr uint64_t kSeed = 9;
  TempDir tmp;

  // The checkpoint: written at step 7 by an optimizer like the running one (or one that
  // differs as the case says), from other initial weights, so any partial load would show.
  Config saver_cfg = running;
  refusal.saver(&saver_cfg);
  std::string dir = tmp.Sub("ckpt");
  {
    AbiHarness saver(saver_cfg.options, saver_cfg.spec, saver_cfg.tensors, kSeed + 1);
    MDOPT_ASSERT_OK(mdopt_finalize(saver.opt()));
    RunSteps(saver, kSeed + 1, 0, 7);
    if (HasFatalFailure()) return;
    MDOPT_ASSERT_OK(mdopt_save(saver.opt(), dir.c_str()));
  }
  dir = refusal.damage(dir);

  AbiHarness opt(running.options, running.spec, running.tensors, kSeed);
  AbiHarness twin(running.options, running.spec, running.tensors, kSeed);
  MDOPT_ASSERT_OK(mdopt_finalize(opt.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(twin.opt()));
  RunSteps(opt, kSeed, 0, 4);
  RunSteps(twin, kSeed, 0, 4);
  if (HasFatalFailure()) return;

  const mdopt_status s = mdopt_load(opt.opt(), dir.c_str());
  const std::string message = mdopt_last_error();
  EXPECT_EQ(s, MDOPT_IO_ERROR) << mdopt_status_string(s) << ": " << message;
  std::cout << "[ refused  ] " << refusal.name << ": " << message << "\n";
  for (const std::string& want : refusal.message)
    EXPECT_NE(message.find(want), std::string::npos) << "message '" << message << "' lacks '" << want << "'";
  ASSERT_TRUE(BitwiseEqual(Take(opt), Take(twin))) << "after the refused load";
  // Steps 5..9 report the counter of the untouched run (not 7 + 1 ...) and stay identical.
  RunSteps(opt, kSeed, 4, 9);
  RunSteps(twin, kSeed, 4, 9);
  if (HasFatalFailure()) return;
  EXPECT_TRUE(BitwiseEqual(Take(opt), Take(twin))) << "5 steps after the refused load";
}

INSTANTIATE_TEST_SUITE_P(checkpoint, Refuse,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(Refusals().size())),
                                            ::testing::Range(0, 2)),
                         [](const auto& info) {
                           return Refusals()[std::get<0>(info.param)].name +
                                  (std::get<1>(info.param) == 0 ? "_fast_bf16" : "_reference");
                         });

// The control for every refusal above: the same checkpoint, undamaged, loads, and the
// optimizer then holds the saver's state and continues its step count.
TEST(checkpoint, UndamagedCheckpointLoads) {
  for (int engine = 0; engine < 2; ++engine) {
    const Config c = RunningConfig(engine);
    SCOPED_TRACE(c.options);
    TempDir tmp;
    const std::string dir = tmp.Sub("ckpt");
    AbiHarness saver(c.options, c.spec, c.tensors, 10);
    MDOPT_ASSERT_OK(mdopt_finalize(saver.opt()));
    RunSteps(saver, 10, 0, 7);
    MDOPT_ASSERT_OK(mdopt_save(saver.opt(), dir.c_str()));
    AbiHarness opt(c.options, c.spec, c.tensors, 9);
    MDOPT_ASSERT_OK(mdopt_finalize(opt.opt()));
    RunSteps(opt, 9, 0, 4);
    MDOPT_ASSERT_OK(mdopt_load(opt.opt(), dir.c_str()));
    EXPECT_TRUE(BitwiseEqual(Take(opt), Take(saver)));
    RunSteps(opt, 10, 7, 9);
    RunSteps(saver, 10, 7, 9);
    EXPECT_TRUE(BitwiseEqual(Take(opt), Take(saver)));
  }
}

// Hyperparameters outside the state layout (lr, betas, ...) may change between save and
// load, as checkpoint.h says: a schedule or a tuned lr must not invalidate a checkpoint.
TEST(checkpoint, OtherLearningRateIsAccepted) {
  const Config c = RunningConfig(0);
  TempDir tmp;
  const std::string dir = tmp.Sub("ckpt");
  AbiHarness saver(c.options, c.spec, c.tensors, 10);
  MDOPT_ASSERT_OK(mdopt_finalize(saver.opt()));
  RunSteps(saver, 10, 0, 3);
  MDOPT_ASSERT_OK(mdopt_save(saver.opt(), dir.c_str()));
  AbiHarness opt(c.options, c.spec + " lr=0.004 beta1=0.8", c.tensors, 10);
  MDOPT_ASSERT_OK(mdopt_finalize(opt.opt()));
  MDOPT_ASSERT_OK(mdopt_load(opt.opt(), dir.c_str()));
  EXPECT_TRUE(BitwiseEqual(Take(opt), Take(saver)));
}

// A later version may add keys to the manifest: a reader ignores what it does not know
// (the checksum, over every key, still has to match).
TEST(checkpoint, UnknownManifestKeysAreTolerated) {
  const Config c = RunningConfig(0);
  TempDir tmp;
  const std::string dir = tmp.Sub("ckpt");
  AbiHarness saver(c.options, c.spec, c.tensors, 10);
  MDOPT_ASSERT_OK(mdopt_finalize(saver.opt()));
  RunSteps(saver, 10, 0, 3);
  MDOPT_ASSERT_OK(mdopt_save(saver.opt(), dir.c_str()));
  nlohmann::json m = nlohmann::json::parse(testing::ReadBytes(dir + "/" + kManifest));
  m["added_by_a_later_version"] = {{"anything", 1}};
  m["params"][0]["also_new"] = "x";
  m.erase("crc32c");
  const std::string body = m.dump();
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08x", Crc32c(0, body.data(), body.size()));
  m["crc32c"] = hex;
  testing::WriteBytes(dir + "/" + kManifest, m.dump(2));
  AbiHarness opt(c.options, c.spec, c.tensors, 9);
  MDOPT_ASSERT_OK(mdopt_finalize(opt.opt()));
  MDOPT_ASSERT_OK(mdopt_load(opt.opt(), dir.c_str()));
  EXPECT_TRUE(BitwiseEqual(Take(opt), Take(saver)));
}

// ---------------------------------------------------------------------------------------
// (c) Atomic saves.

bool HasTmpFiles(const std::string& dir) {
  for (const std::string& name : testing::ListDir(dir))
    if (name.size() >= 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) return true;
  return false;
}

TEST(checkpoint, AtomicSaveLeavesNoTemporariesAndSavesTwice) {
  for (const char* options : {"kernels=fast", "kernels=reference"}) {
    SCOPED_TRACE(options);
    const std::vector<TensorSpec> tensors = {{"wide", {7, 19}}, {"experts", {3, 5, 8}}};
    TempDir tmp;
    // A directory that does not exist yet, two levels deep: save creates it.
    const std::string dir = tmp.Sub("a/b");
    AbiHarness h(options, "preset=md-muon", tensors, 3);
    MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
    RunSteps(h, 3, 0, 3);
    MDOPT_ASSERT_OK(mdopt_save(h.opt(), dir.c_str()));
    const std::string first_name = testing::RankFileOf(dir);
    EXPECT_EQ(first_name.rfind(kRankFile, 0), 0u) << first_name;
    EXPECT_EQ(testing::ListDir(dir), (std::vector<std::string>{kManifest, first_name}));
    EXPECT_FALSE(HasTmpFiles(dir));

    // Leftovers of a save that crashed before its renames must not get in the way.
    testing::WriteBytes(dir + "/" + kManifest + ".tmp", "junk from a crashed save");
    testing::WriteBytes(dir + "/" + first_name + ".tmp", "junk");

    RunSteps(h, 3, 3, 6);
    const Snapshot at6 = Take(h);
    MDOPT_ASSERT_OK(mdopt_save(h.opt(), dir.c_str()));
    // The new rank file has a new name; the old one, named by no manifest, is gone.
    const std::string second_name = testing::RankFileOf(dir);
    EXPECT_NE(second_name, first_name) << "second save did not replace";
    EXPECT_EQ(testing::ListDir(dir), (std::vector<std::string>{kManifest, second_name}));
    EXPECT_FALSE(HasTmpFiles(dir));
    EXPECT_EQ(nlohmann::json::parse(testing::ReadBytes(dir + "/" + kManifest))["step"], 6);

    // The second checkpoint is the one that loads, and the counter continues from 6.
    AbiHarness fresh(options, "preset=md-muon", tensors, 3);
    MDOPT_ASSERT_OK(mdopt_finalize(fresh.opt()));
    MDOPT_ASSERT_OK(mdopt_load(fresh.opt(), dir.c_str()));
    EXPECT_TRUE(BitwiseEqual(Take(fresh), at6));
    RunSteps(fresh, 3, 6, 8);
    RunSteps(h, 3, 6, 8);
    EXPECT_TRUE(BitwiseEqual(Take(fresh), Take(h)));
  }
}

// A save into a directory that holds a checkpoint writes its content-named rank file first
// and renames the manifest into place last. If it dies between the two, the directory holds
// the old manifest, the old rank file and the new rank file: the old checkpoint must still
// load, whole.
TEST(checkpoint, SaveInterruptedBeforeItsManifestLeavesTheOldCheckpoint) {
  const std::vector<TensorSpec> tensors = {{"wide", {7, 19}}, {"experts", {3, 5, 8}}};
  TempDir tmp;
  const std::string dir = tmp.Sub("ckpt");
  AbiHarness h("kernels=fast", "preset=md-muon", tensors, 5);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  RunSteps(h, 5, 0, 3);
  MDOPT_ASSERT_OK(mdopt_save(h.opt(), dir.c_str()));
  const Snapshot at3 = Take(h);
  RunSteps(h, 5, 3, 6);
  // What the interrupted second save had written: its rank file, not its manifest.
  MDOPT_ASSERT_OK(mdopt_save(h.opt(), tmp.Sub("second").c_str()));
  const std::string second_rank = testing::RankFileOf(tmp.Sub("second"));
  ASSERT_NE(second_rank, testing::RankFileOf(dir));
  std::filesystem::copy_file(tmp.Sub("second") + "/" + second_rank, dir + "/" + second_rank);

  AbiHarness fresh("kernels=fast", "preset=md-muon", tensors, 5);
  MDOPT_ASSERT_OK(mdopt_finalize(fresh.opt()));
  MDOPT_ASSERT_OK(mdopt_load(fresh.opt(), dir.c_str()));
  EXPECT_TRUE(BitwiseEqual(Take(fresh), at3));
}

// A manifest paired with another save's rank file (copied under the name the manifest
// gives, or missing under it) must be refused, never loaded.
TEST(checkpoint, MixOfTwoSavesIsRefused) {
  const std::vector<TensorSpec> tensors = {{"wide", {7, 19}}, {"experts", {3, 5, 8}}};
  TempDir tmp;
  AbiHarness h("kernels=fast", "preset=md-muon", tensors, 5);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  RunSteps(h, 5, 0, 3);
  MDOPT_ASSERT_OK(mdopt_save(h.opt(), tmp.Sub("old").c_str()));
  RunSteps(h, 5, 3, 6);
  MDOPT_ASSERT_OK(mdopt_save(h.opt(), tmp.Sub("new").c_str()));
  for (const auto& [manifest_from, rank_from] :
       std::vector<std::pair<std::string, std::string>>{{"old", "new"}, {"new", "old"}}) {
    const std::string mixed = tmp.Sub("mixed-" + manifest_from);
    std::filesystem::create_directories(mixed);
    std::filesystem::copy_file(tmp.Sub(manifest_from) + "/" + kManifest, mixed + "/" + kManifest);
    std::filesystem::copy_file(tmp.Sub(rank_from) + "/" + testing::RankFileOf(tmp.Sub(rank_from)),
                               mixed + "/" + testing::RankFileOf(tmp.Sub(manifest_from)));
    AbiHarness fresh("kernels=fast", "preset=md-muon", tensors, 5);
    MDOPT_ASSERT_OK(mdopt_finalize(fresh.opt()));
    const Snapshot before = Take(fresh);
    EXPECT_EQ(mdopt_load(fresh.opt(), mixed.c_str()), MDOPT_IO_ERROR) << manifest_from;
    EXPECT_NE(std::string(mdopt_last_error()).find(kRankFile), std::string::npos) << mdopt_last_error();
    EXPECT_TRUE(BitwiseEqual(Take(fresh), before));
  }
}

// A save that cannot write (the directory's path runs through a regular file) fails with
// IO_ERROR and changes nothing of the optimizer.
TEST(checkpoint, SaveToUnwritableDirectoryIsIoError) {
  TempDir tmp;
  testing::WriteBytes(tmp.Sub("file"), "x");
  AbiHarness h("kernels=fast", "preset=md-muon", {{"wide", {7, 19}}}, 4);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  RunSteps(h, 4, 0, 2);
  const Snapshot before = Take(h);
  const std::string dir = tmp.Sub("file/ckpt");
  EXPECT_EQ(mdopt_save(h.opt(), dir.c_str()), MDOPT_IO_ERROR);
  EXPECT_NE(std::string(mdopt_last_error()).find(dir), std::string::npos) << mdopt_last_error();
  EXPECT_TRUE(BitwiseEqual(Take(h), before));
}

}  // namespace
}  // namespace mdopt
