// Checkpoints across rank counts, under mpirun at 4 ranks:
//  (a) a chain 4 -> 3 -> 2 -> 1: train 5 steps at 4 ranks and save; ranks [0, 3) (an
//      MPI_Comm_split of the world) load it, take 3 steps and save; then [0, 2), then rank
//      0 alone (a local communicator). Right after every load the state is bitwise the
//      saver's (the collective mdopt_get_state fields), and after 14 steps the weights and
//      state equal an uninterrupted one-rank run within the sharded tolerance; for md-muon
//      (rows and owner layouts) and md-adamw, f32 and bf16 weights, on shapes that do not
//      divide evenly (odd m, m < N, 1 x n, a 3-D stack);
//  (b) a checkpoint written at 1 rank loads at 4, bitwise;
//  (c) at 4 ranks, a missing rank file, a flipped bit in one rank file and a checkpoint of
//      another param shape are refused on every rank with DataLoss and the same message,
//      the state bitwise untouched;
//  (d) params that skipped steps (no gradient) keep their own step counts through a save
//      at 4 ranks and a load at 3, and the run continues as an uninterrupted one-rank run;
//      a manifest without per-param counts (written before they existed) loads with every
//      count equal to the optimizer's step.
#include <gtest/gtest.h>
#include <mpi.h>
#include <stdlib.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/crc32c.h"
#include "dist_opt/optimizer.h"
#include "nlohmann/json.hpp"
#include "tests/dist/dist_harness.h"

namespace mdopt::dist_test {
namespace {

// As tests/dist/sharded_step_test.cc: the sharded step equals one rank to ~3e-7.
constexpr double kTolerance = 5e-6;

WorstError* const g_worst = AddWorstErrorReport("ckpt_reshard_test");

// Ranks [0, k) of the world as a communicator of their own (k == 1: a local one); nullptr
// on the other ranks. Collective over the world.
std::unique_ptr<Communicator> FirstRanks(int k) {
  const int rank = World()->rank();
  MPI_Comm c = MPI_COMM_NULL;
  EXPECT_EQ(MPI_Comm_split(MPI_COMM_WORLD, rank < k ? 0 : MPI_UNDEFINED, rank, &c), MPI_SUCCESS);
  if (c == MPI_COMM_NULL) return nullptr;
  std::unique_ptr<Communicator> out;
  if (k == 1) {
    out = MakeLocalCommunicator();
  } else {
    absl::StatusOr<std::unique_ptr<Communicator>> m = MakeMpiCommunicator(&c);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) out = *std::move(m);
  }
  MPI_Comm_free(&c);  // mdopt works on its own duplicate
  return out;
}

// A directory every rank names the same: made by rank 0, its name broadcast.
std::string SharedTempDir() {
  char name[256] = {};
  if (World()->rank() == 0) {
    const char* root = getenv("TMPDIR");
    std::snprintf(name, sizeof name, "%s/mdopt_reshard_XXXXXX", root != nullptr ? root : "/tmp");
    EXPECT_NE(mkdtemp(name), nullptr);
  }
  EXPECT_TRUE(BroadcastBytes(*World(), absl::MakeSpan(reinterpret_cast<uint8_t*>(name), sizeof name), 0).ok());
  return name;
}

// The test's model, finalized; every rank passes the same (mean) gradient.
class Trainer : public TestModel {
 public:
  Trainer(Communicator* comm, const std::string& spec, bool bf16, std::vector<Tensor> tensors = {})
      : TestModel(comm, "threads=1 grads=reduced", spec, bf16, std::move(tensors)) {
    EXPECT_TRUE(opt().Finalize().ok());
  }

  void Step(int step) {
    SetShared(step);
    absl::StatusOr<StepResult> r = opt().Step(1.0, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_FALSE(r->skipped);
    ASSERT_EQ(r->step, step);
  }
  void Steps(int first, int last) {
    for (int s = first; s <= last; ++s) ASSERT_NO_FATAL_FAILURE(Step(s));
  }
};

// bf16 model copies ("model/<name>" of bf16 params) are held to one bf16 ulp of their largest
// weight: a float32 master an ulp apart (cross-row sums added in another order at another
// rank count) can round to the neighbouring bf16 value. Their float32 masters keep kTolerance.
void ExpectClose(const std::map<std::string, std::vector<double>>& got,
                 const std::map<std::string, std::vector<double>>& want, bool bf16) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [key, w] : want) {
    const auto it = got.find(key);
    ASSERT_NE(it, got.end()) << key;
    ASSERT_EQ(it->second.size(), w.size()) << key;
    const double err = RelMaxError(it->second, w);
    const bool bf16_model = bf16 && key.rfind("model/", 0) == 0;
    if (!bf16_model) g_worst->Record(err);
    EXPECT_LE(err, bf16_model ? 1.0 / 256 : kTolerance) << key;
  }
}

struct Case {
  std::string spec;
  std::string layout;
  bool bf16;
  std::string Name() const { return spec + " layout=" + layout + (bf16 ? " bf16" : " f32"); }
  // blocks=rows:2 needs even rows: a GLU fc1, a stack of them, blocks of one row.
  std::vector<Tensor> Model() const {
    if (spec.find("blocks=") == std::string::npos) return {};
    if (spec.find("blocks=groups:") != std::string::npos)  // GQA-like: 4 groups of 3, 2, 2 rows
      return {{"qkv", {28, 19}}, {"stack", {3, 28, 8}}};
    return {{"fc1", {14, 19}}, {"small", {2, 9}}, {"experts", {3, 10, 8}}, {"big", {40, 90}}};
  }
};

const Case kCases[] = {{"preset=md-muon", "rows", false},
                       {"preset=md-muon", "owner", false},
                       {"preset=md-muon", "rows", true},
                       {"preset=md-muon", "owner", true},
                       {"preset=md-adamw", "rows", false},
                       {"preset=md-adamw", "owner", true},
                       {"preset=md-muon blocks=rows:2", "rows", false},
                       {"preset=md-adamw blocks=rows:2", "owner", false},
                       // shared column/scalar gains: K copies per matrix, resharded as such
                       {"preset=md-muon gains=scalar blocks=rows:2", "owner", false},
                       {"preset=md-adamw gains=col blocks=rows:2", "rows", true},
                       // interleaved blocks: the state in block order, the model through the map
                       {"preset=md-muon blocks=groups:4:3,2,2", "rows", false},
                       {"preset=md-adamw gains=col blocks=groups:4:3,2,2", "owner", true}};

std::string CaseName(const ::testing::TestParamInfo<int>& info) {
  return TestNameOf(kCases[info.param].Name());
}

class Reshard : public ::testing::TestWithParam<int> {};

TEST_P(Reshard, ChainFourThreeTwoOneEqualsOneRank) {
  const Case& c = kCases[GetParam()];
  SCOPED_TRACE(c.Name());
  ASSERT_NE(World(), nullptr);
  ASSERT_EQ(World()->size(), 4) << "run under mpirun -np 4";
  const std::string spec = c.spec + " layout=" + c.layout;
  const std::string root = SharedTempDir();

  // The uninterrupted one-rank run (on every rank: it is deterministic).
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  Trainer straight(local.get(), spec, c.bf16, c.Model());
  ASSERT_NO_FATAL_FAILURE(straight.Steps(1, 14));
  const auto want = straight.Everything();

  struct Segment {
    int ranks, first, last;
  };
  const Segment chain[] = {{4, 1, 5}, {3, 6, 8}, {2, 9, 11}, {1, 12, 14}};
  std::map<std::string, std::vector<double>> saved;  // the last saver's state, on its ranks
  for (size_t k = 0; k < std::size(chain); ++k) {
    const Segment& seg = chain[k];
    SCOPED_TRACE(seg.ranks);
    std::unique_ptr<Communicator> sub = FirstRanks(seg.ranks);
    bool ok = true;
    if (sub != nullptr) {
      ok = false;
      [&] {
        Trainer run(sub.get(), spec, c.bf16, c.Model());
        if (k > 0) {
          const std::string from = root + "/at" + std::to_string(chain[k - 1].ranks);
          absl::Status s = run.opt().Load(from);
          ASSERT_TRUE(s.ok()) << s;
          ASSERT_EQ(run.opt().steps_taken(), seg.first - 1);
          const auto loaded = run.Everything();
          ASSERT_EQ(loaded.size(), saved.size());
          for (const auto& [key, v] : saved) EXPECT_EQ(loaded.at(key), v) << "right after load: " << key;
        }
        ASSERT_NO_FATAL_FAILURE(run.Steps(seg.first, seg.last));
        saved = run.Everything();
        absl::Status s = run.opt().Save(root + "/at" + std::to_string(seg.ranks));
        ASSERT_TRUE(s.ok()) << s;
        if (k + 1 == std::size(chain)) ExpectClose(saved, want, c.bf16);
        if (k > 0) {
          // Over the checkpoint of more ranks: afterwards the directory holds this save's
          // manifest and files alone (those of ranks this save lacks are gone too).
          const std::string over = root + "/at" + std::to_string(chain[k - 1].ranks);
          s = run.opt().Save(over);
          ASSERT_TRUE(s.ok()) << s;
          // Each rank removes its own earlier file after the commit: wait for all of them.
          ASSERT_TRUE(BarrierBlocking(*sub).ok());
          if (sub->rank() == 0) {
            size_t files = 0;
            for (const auto& e : std::filesystem::directory_iterator(over)) {
              const std::string n = e.path().filename().string();
              EXPECT_TRUE(n == "manifest.json" || (n.rfind("rank-", 0) == 0 && n.size() == 25)) << n;
              ++files;
            }
            EXPECT_EQ(files, static_cast<size_t>(seg.ranks) + 1);
          }
        }
        ok = true;
      }();
    }
    ASSERT_NO_FATAL_FAILURE(Barrier());
    ASSERT_TRUE(ok);
  }
  Barrier();
  if (World()->rank() == 0) std::filesystem::remove_all(root);
}

TEST_P(Reshard, OneRankCheckpointLoadsAtFour) {
  const Case& c = kCases[GetParam()];
  SCOPED_TRACE(c.Name());
  ASSERT_NE(World(), nullptr);
  const std::string spec = c.spec + " layout=" + c.layout;
  const std::string dir = SharedTempDir() + "/at1";
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  Trainer single(local.get(), spec, c.bf16, c.Model());
  ASSERT_NO_FATAL_FAILURE(single.Steps(1, 5));
  if (World()->rank() == 0) {
    ASSERT_TRUE(single.opt().Save(dir).ok());
  }
  ASSERT_NO_FATAL_FAILURE(Barrier());

  Trainer four(World(), spec, c.bf16, c.Model());
  absl::Status s = four.opt().Load(dir);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(four.opt().steps_taken(), 5);
  const auto want = single.Everything(), got = four.Everything();
  for (const auto& [key, v] : want) EXPECT_EQ(got.at(key), v) << key;
  ASSERT_NO_FATAL_FAILURE(four.Steps(6, 8));
  ASSERT_NO_FATAL_FAILURE(single.Steps(6, 8));
  ExpectClose(four.Everything(), single.Everything(), c.bf16);
  Barrier();
  if (World()->rank() == 0) std::filesystem::remove_all(std::filesystem::path(dir).parent_path());
}

INSTANTIATE_TEST_SUITE_P(ckpt, Reshard, ::testing::Range(0, static_cast<int>(std::size(kCases))), CaseName);

std::string RankFileOf(const std::string& dir, int rank) {
  std::ifstream in(dir + "/manifest.json");
  const nlohmann::json m = nlohmann::json::parse(in);
  return m["rank_files"][rank]["name"].get<std::string>();
}

// Refused on every rank with DataLoss and one message, the state bitwise untouched.
TEST(ckpt, RefusalsAtFourRanksLeaveStateUntouched) {
  ASSERT_NE(World(), nullptr);
  const int rank = World()->rank();
  const std::string spec = "preset=md-muon layout=rows";
  const std::string root = SharedTempDir();
  {
    Trainer saver(World(), spec, false);
    ASSERT_NO_FATAL_FAILURE(saver.Steps(1, 5));
    ASSERT_TRUE(saver.opt().Save(root + "/good").ok());
    std::vector<Tensor> other = Tensors(false);
    other[0].shape = {7, 20};
    Trainer wrong(World(), spec, false, other);
    ASSERT_NO_FATAL_FAILURE(wrong.Steps(1, 5));
    ASSERT_TRUE(wrong.opt().Save(root + "/other_shape").ok());
  }
  if (rank == 0) {
    namespace fs = std::filesystem;
    fs::copy(root + "/good", root + "/missing");
    fs::remove(root + "/missing/" + RankFileOf(root + "/good", 2));
    fs::copy(root + "/good", root + "/flipped");
    const std::string path = root + "/flipped/" + RankFileOf(root + "/good", 1);
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(36);  // the first byte of the first array (its rows are read again at 4 ranks)
    char b = 0;
    f.read(&b, 1);
    b ^= 0x10;
    f.seekp(36);
    f.write(&b, 1);
  }
  ASSERT_NO_FATAL_FAILURE(Barrier());

  Trainer opt(World(), spec, false);
  ASSERT_NO_FATAL_FAILURE(opt.Steps(1, 2));
  for (const auto& [name, want] : std::vector<std::pair<std::string, std::string>>{
           {"missing", "rank-00002."}, {"flipped", "checksum"}, {"other_shape", "does not match"}}) {
    SCOPED_TRACE(name);
    const auto before = opt.Everything();
    const absl::Status s = opt.opt().Load(root + "/" + name);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(s.message().find(want), absl::string_view::npos) << s;
    if (rank == 0) std::printf("[ refused  ] %s: %s\n", name.c_str(), std::string(s.message()).c_str());
    // The same message on every rank.
    char mine[1024] = {}, first[1024] = {};
    std::snprintf(mine, sizeof mine, "%s", std::string(s.message()).c_str());
    std::memcpy(first, mine, sizeof mine);
    ASSERT_TRUE(BroadcastBytes(*World(), absl::MakeSpan(reinterpret_cast<uint8_t*>(first), sizeof first), 0).ok());
    EXPECT_STREQ(mine, first);
    EXPECT_EQ(opt.opt().steps_taken(), 2);
    const auto after = opt.Everything();
    EXPECT_TRUE(after == before) << "state changed by a refused load";
  }
  ASSERT_NO_FATAL_FAILURE(opt.Steps(3, 4));
  ASSERT_TRUE(opt.opt().Load(root + "/good").ok());
  EXPECT_EQ(opt.opt().steps_taken(), 5);
  Barrier();
  if (rank == 0) std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace mdopt::dist_test

namespace mdopt::dist_test {
namespace {

// Params 1 ("small") and 4 ("experts") have no gradient at steps 2, 3 and 7 on any rank.
bool Skipping(int step) { return step == 2 || step == 3 || step == 7; }
constexpr size_t kSkippedParams[] = {1, 4};

void StepSkipping(Trainer& t, int step) {
  for (size_t i : kSkippedParams) ASSERT_TRUE(t.HasGrad(i, !Skipping(step)).ok());
  ASSERT_NO_FATAL_FAILURE(t.Step(step));
}

// Each param's "step" field.
std::vector<double> Counts(Trainer& t) {
  std::vector<double> out;
  for (size_t i = 0; i < t.size(); ++i) {
    absl::StatusOr<std::vector<double>> v = t.opt().GetState(static_cast<int64_t>(i), "step");
    EXPECT_TRUE(v.ok()) << v.status();
    out.push_back(v.ok() && v->size() == 1 ? (*v)[0] : -1.0);
  }
  return out;
}

TEST(ckpt, SkippedParamsKeepTheirCountsAcrossRankCounts) {
  ASSERT_NE(World(), nullptr);
  ASSERT_EQ(World()->size(), 4) << "run under mpirun -np 4";
  const std::string spec = "preset=md-adamw layout=rows";
  const std::string root = SharedTempDir();
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  Trainer straight(local.get(), spec, false);
  for (int s = 1; s <= 8; ++s) ASSERT_NO_FATAL_FAILURE(StepSkipping(straight, s));
  const std::vector<double> want_counts = {8, 5, 8, 8, 5, 8, 8};
  EXPECT_EQ(Counts(straight), want_counts);
  const auto want = straight.Everything();

  std::map<std::string, std::vector<double>> saved;
  {
    Trainer four(World(), spec, false);
    for (int s = 1; s <= 5; ++s) ASSERT_NO_FATAL_FAILURE(StepSkipping(four, s));
    EXPECT_EQ(Counts(four), (std::vector<double>{5, 3, 5, 5, 3, 5, 5}));
    saved = four.Everything();
    ASSERT_TRUE(four.opt().Save(root + "/at4").ok());
  }
  std::unique_ptr<Communicator> three = FirstRanks(3);
  bool ok = true;
  if (three != nullptr) {
    ok = false;
    [&] {
      Trainer run(three.get(), spec, false);
      absl::Status s = run.opt().Load(root + "/at4");
      ASSERT_TRUE(s.ok()) << s;
      const auto loaded = run.Everything();
      for (const auto& [key, v] : saved) EXPECT_EQ(loaded.at(key), v) << "right after load: " << key;
      for (int step = 6; step <= 8; ++step) ASSERT_NO_FATAL_FAILURE(StepSkipping(run, step));
      EXPECT_EQ(Counts(run), want_counts);
      ExpectClose(run.Everything(), want, false);
      ok = true;
    }();
  }
  ASSERT_NO_FATAL_FAILURE(Barrier());
  ASSERT_TRUE(ok);

  // The same checkpoint as an older build wrote it: no param_steps in the manifest (its
  // checksum recomputed as the format defines it: over the compact dump of the other keys).
  if (World()->rank() == 0) {
    namespace fs = std::filesystem;
    fs::copy(root + "/at4", root + "/old");
    nlohmann::json m;
    {
      std::ifstream in(root + "/old/manifest.json");
      m = nlohmann::json::parse(in);
    }
    ASSERT_TRUE(m.contains("param_steps"));
    m.erase("param_steps");
    m.erase("crc32c");
    const std::string compact = m.dump();
    char crc[16];
    std::snprintf(crc, sizeof crc, "%08x", Crc32c(0, compact.data(), compact.size()));
    m["crc32c"] = crc;
    std::ofstream(root + "/old/manifest.json") << m.dump(1) << "\n";
  }
  ASSERT_NO_FATAL_FAILURE(Barrier());
  Trainer old(World(), spec, false);
  ASSERT_NO_FATAL_FAILURE(old.Steps(1, 2));
  absl::Status s = old.opt().Load(root + "/old");
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(old.opt().steps_taken(), 5);
  EXPECT_EQ(Counts(old), std::vector<double>(old.size(), 5.0)) << "each count = the step";
  // The state arrays load as they were saved.
  const auto loaded = old.Everything();
  for (const auto& [key, v] : saved) {
    if (key.size() < 5 || key.substr(key.size() - 5) != "/step") EXPECT_EQ(loaded.at(key), v) << key;
  }
  Barrier();
  if (World()->rank() == 0) std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace mdopt::dist_test
