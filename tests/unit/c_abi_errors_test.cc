// Bad input at every entry point of the C ABI (include/mdopt/*.h; DESIGN.md sections 4 and
// 6): NULL pointers, short structs, bad options and specs, bad names, shapes and dtypes,
// calls out of order, weights that cannot go onto their sphere, non-finite gradients.
// Every failing call must return its exact status with a message naming what is wrong and
// leave the optimizer as it was (optimizer.h: "the optimizer is left exactly as it was
// before the call"). So the tests that hold an optimizer end by comparing its state bit for
// bit with a twin that never saw the bad calls, then stepping both and comparing again.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "numeric_util.h"
#include "test_util.h"

namespace mdopt {
namespace {

namespace fs = std::filesystem;
using testing::Buffers;
using testing::Fill;
using testing::RandomNormal;

constexpr mdopt_dtype F32 = MDOPT_DTYPE_F32;
constexpr mdopt_dtype BF16 = MDOPT_DTYPE_BF16;
constexpr uint16_t kBf16NaN = 0x7FC0, kBf16Inf = 0x7F80, kBf16NegInf = 0xFF80;

// Checks a failed call: the exact status, a non-empty message, and every needle in it.
// Reads mdopt_last_error() before anything else can call into mdopt.
void ExpectFailure(const char* call, mdopt_status got, mdopt_status want,
                   const std::vector<std::string>& needles) {
  const std::string message = mdopt_last_error();
  EXPECT_EQ(got, want) << call << " returned " << mdopt_status_string(got) << " ('" << message
                       << "'), expected " << mdopt_status_string(want);
  EXPECT_FALSE(message.empty()) << call << ": no message";
  for (const std::string& n : needles) {
    EXPECT_NE(message.find(n), std::string::npos)
        << call << ": message '" << message << "' does not contain '" << n << "'";
  }
}
#define EXPECT_MDOPT_ERROR(want, call, ...) ExpectFailure(#call, (call), (want), {__VA_ARGS__})

// A dtype value outside the enum, as a C caller can store it: the dtype fields are int32_t.
int32_t BadDtype(int32_t v) { return v; }

// A fresh directory under the test's temp dir, removed by the destructor.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "mdopt_c_abi_errors_XXXXXX";
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr) << tmpl;
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A checkpoint of `opt` as bytes (manifest, state file): every group with its canonical
// spec, every param with its shape and dtypes, the step count and every state array.
std::pair<std::string, std::string> CheckpointBytes(mdopt_optimizer* opt, const std::string& dir) {
  const mdopt_status s = mdopt_save(opt, dir.c_str());
  EXPECT_EQ(s, MDOPT_SUCCESS) << mdopt_last_error();
  if (s != MDOPT_SUCCESS) return {};
  return {ReadBytes(dir + "/manifest.json"), ReadBytes(dir + "/" + testing::RankFileOf(dir))};
}

using OptimizerPtr = std::unique_ptr<mdopt_optimizer, mdopt_status (*)(mdopt_optimizer*)>;

// --- the model every test uses -----------------------------------------------------------

struct TensorDef {
  std::string name;
  std::string group;
  std::vector<int64_t> shape;
  mdopt_dtype param_dtype;
  mdopt_dtype grad_dtype;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

// One of each kind: an f32 matrix and a bf16 expert stack under md-muon, a bf16 embedding
// (row sphere), f32 and bf16 vectors.
std::vector<TensorDef> StandardModel() {
  return {{"w", "mat", {6, 4}, F32, F32},
          {"x", "mat", {2, 3, 5}, BF16, F32},
          {"e", "emb", {5, 3}, BF16, BF16},
          {"b", "vec", {7}, F32, F32},
          {"h", "vec", {4}, BF16, BF16}};
}

// An optimizer with the standard model (or a variant), its buffers, gradients and state.
class Rig {
 public:
  explicit Rig(std::string mat_spec = "preset=md-muon", std::string options = "threads=1")
      : mat_spec_(std::move(mat_spec)), options_(std::move(options)), defs_(StandardModel()) {}
  ~Rig() {
    mdopt_destroy(opt_);
    mdopt_comm_destroy(comm_);
  }
  Rig(const Rig&) = delete;
  Rig& operator=(const Rig&) = delete;

  void Create() {
    MDOPT_ASSERT_OK(mdopt_comm_create_local(&comm_));
    MDOPT_ASSERT_OK(mdopt_create(comm_, options_.c_str(), &opt_));
  }
  void AddGroups() {
    MDOPT_ASSERT_OK(mdopt_add_group(opt_, "mat", mat_spec_.c_str()));
    MDOPT_ASSERT_OK(mdopt_add_group(opt_, "emb", "preset=embedding"));
    MDOPT_ASSERT_OK(mdopt_add_group(opt_, "vec", "preset=vector"));
  }
  // Weights of a 1/sqrt(d_in) init (deterministic in the tensor's position), zero gradients.
  void AddParams() {
    bufs_.resize(defs_.size());
    for (size_t i = 0; i < defs_.size(); ++i) {
      const TensorDef& t = defs_[i];
      const double scale = 1.0 / std::sqrt(static_cast<double>(t.shape.back()));
      Fill(RandomNormal(static_cast<size_t>(t.numel()), 500 + i, scale), t.param_dtype,
           &bufs_[i].param_f32, &bufs_[i].param_bf16);
      Fill(std::vector<double>(static_cast<size_t>(t.numel()), 0.0), t.grad_dtype,
           &bufs_[i].grad_f32, &bufs_[i].grad_bf16);
      const mdopt_param_desc d = Desc(i);
      int64_t index = -1;
      MDOPT_ASSERT_OK(mdopt_add_param(opt_, &d, &index));
      ASSERT_EQ(index, static_cast<int64_t>(i)) << t.name;
    }
  }
  void Build() {
    ASSERT_NO_FATAL_FAILURE(Create());
    ASSERT_NO_FATAL_FAILURE(AddGroups());
    ASSERT_NO_FATAL_FAILURE(AddParams());
  }
  void BuildFinalized() {
    ASSERT_NO_FATAL_FAILURE(Build());
    MDOPT_ASSERT_OK(mdopt_finalize(opt_));
  }

  mdopt_param_desc Desc(size_t i) {
    const TensorDef& t = defs_[i];
    return testing::DescFor(t.name, t.group, t.shape, t.param_dtype, bufs_[i].param(),
                            t.grad_dtype, bufs_[i].grad());
  }

  // Gradients of one step: deterministic in (step, tensor), so twins see the same ones.
  void SetGradients(int step) {
    for (size_t i = 0; i < defs_.size(); ++i) {
      const std::vector<double> g =
          RandomNormal(static_cast<size_t>(defs_[i].numel()), 9000 + 37 * step + i, 0.1);
      std::vector<float> f;
      std::vector<uint16_t> h;
      Fill(g, defs_[i].grad_dtype, &f, &h);
      // Copied into the registered buffers, which must not move.
      std::copy(f.begin(), f.end(), bufs_[i].grad_f32.begin());
      std::copy(h.begin(), h.end(), bufs_[i].grad_bf16.begin());
    }
  }
  // Puts one non-finite value into a gradient (f32: as a float, bf16: as its bit pattern).
  void PoisonGradient(size_t i, size_t k, double f32_value, uint16_t bf16_bits) {
    if (defs_[i].grad_dtype == F32) {
      bufs_[i].grad_f32.at(k) = static_cast<float>(f32_value);
    } else {
      bufs_[i].grad_bf16.at(k) = bf16_bits;
    }
  }

  void Step(int step, mdopt_step_info* info_out = nullptr) {
    SetGradients(step);
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(opt_, 1.0, nullptr, &info));
    ASSERT_EQ(info.skipped, 0);
    if (info_out != nullptr) *info_out = info;
  }

  // Every readable field of every param's state plus the model's buffers, as bit patterns.
  std::map<std::string, std::vector<uint64_t>> Snapshot() {
    std::map<std::string, std::vector<uint64_t>> s;
    for (size_t i = 0; i < defs_.size(); ++i) {
      for (const char* field : {"master", "direction", "gain_row", "gain_col", "gain_scalar", "radius",
                                "step"}) {
        int64_t n = 0;
        if (mdopt_get_state(opt_, static_cast<int64_t>(i), field, nullptr, 0, &n) != MDOPT_SUCCESS) {
          continue;  // a field this param lacks
        }
        std::vector<double> v(static_cast<size_t>(n));
        EXPECT_EQ(mdopt_get_state(opt_, static_cast<int64_t>(i), field, v.data(), n, nullptr),
                  MDOPT_SUCCESS)
            << mdopt_last_error();
        std::vector<uint64_t>& bits = s[defs_[i].name + "." + field];
        for (double x : v) {
          uint64_t b;
          std::memcpy(&b, &x, sizeof b);
          bits.push_back(b);
        }
      }
      s[defs_[i].name + ".model"] = ModelBits(i);
    }
    return s;
  }
  std::vector<uint64_t> ModelBits(size_t i) const {
    std::vector<uint64_t> bits;
    for (float f : bufs_[i].param_f32) {
      uint32_t b;
      std::memcpy(&b, &f, sizeof b);
      bits.push_back(b);
    }
    for (uint16_t h : bufs_[i].param_bf16) bits.push_back(h);
    return bits;
  }

  mdopt_optimizer* opt() { return opt_; }
  mdopt_comm* comm() { return comm_; }
  Buffers& buf(size_t i) { return bufs_[i]; }
  const TensorDef& def(size_t i) const { return defs_[i]; }
  size_t size() const { return defs_.size(); }

 private:
  std::string mat_spec_, options_;
  std::vector<TensorDef> defs_;
  std::vector<Buffers> bufs_;
  mdopt_comm* comm_ = nullptr;
  mdopt_optimizer* opt_ = nullptr;
};

void ExpectSameState(Rig& a, Rig& b, const std::string& when) {
  SCOPED_TRACE(when);
  const auto sa = a.Snapshot(), sb = b.Snapshot();
  ASSERT_EQ(sa.size(), sb.size());
  ASSERT_GT(sa.size(), a.size()) << "the snapshot holds no state";
  for (const auto& [key, bits] : sa) {
    auto it = sb.find(key);
    ASSERT_NE(it, sb.end()) << key;
    EXPECT_EQ(bits, it->second) << key << " differs bit for bit";
  }
}

// The twin test every stateful test ends with: same state as a twin that never saw the bad
// calls, and after `steps` more steps on both, still the same.
void ExpectTwinsAfterSteps(Rig& a, Rig& b, int first_step, int steps, const std::string& when) {
  ASSERT_NO_FATAL_FAILURE(ExpectSameState(a, b, when));
  for (int s = first_step; s < first_step + steps; ++s) {
    mdopt_step_info ia{}, ib{};
    ASSERT_NO_FATAL_FAILURE(a.Step(s, &ia));
    ASSERT_NO_FATAL_FAILURE(b.Step(s, &ib));
    EXPECT_EQ(ia.step, ib.step);
    EXPECT_EQ(ia.grad_norm, ib.grad_norm);
  }
  ASSERT_NO_FATAL_FAILURE(ExpectSameState(a, b, when + ", then stepped"));
}

// --- status, versions, last error --------------------------------------------------------

TEST(CAbiStatus, EveryStatusHasItsName) {
  const std::pair<mdopt_status, const char*> all[] = {
      {MDOPT_SUCCESS, "MDOPT_SUCCESS"},
      {MDOPT_INVALID_ARGUMENT, "MDOPT_INVALID_ARGUMENT"},
      {MDOPT_INVALID_STATE, "MDOPT_INVALID_STATE"},
      {MDOPT_COMM_ERROR, "MDOPT_COMM_ERROR"},
      {MDOPT_DEVICE_ERROR, "MDOPT_DEVICE_ERROR"},
      {MDOPT_IO_ERROR, "MDOPT_IO_ERROR"},
      {MDOPT_UNSUPPORTED, "MDOPT_UNSUPPORTED"},
      {MDOPT_INTERNAL, "MDOPT_INTERNAL"}};
  for (size_t k = 0; k < std::size(all); ++k) {
    const auto& [status, name] = all[k];
    ASSERT_NE(mdopt_status_string(status), nullptr);
    EXPECT_STREQ(mdopt_status_string(status), name);
    // The values are stable ABI (status.h): 0 to 7 in this order.
    EXPECT_EQ(static_cast<int>(status), static_cast<int>(k)) << name;
  }
}

TEST(CAbiStatus, Versions) {
  EXPECT_EQ(mdopt_abi_version(), MDOPT_ABI_VERSION);
  const char* v = mdopt_version_string();
  ASSERT_NE(v, nullptr);
  int major = -1, minor = -1, patch = -1;
  char tail = 0;
  EXPECT_EQ(std::sscanf(v, "%d.%d.%d%c", &major, &minor, &patch, &tail), 3) << v;
  EXPECT_GE(major, 0);
  EXPECT_GE(minor, 0);
  EXPECT_GE(patch, 0);
}

// status.h: "The message of the last failed (or skipped) call on the calling thread".
TEST(CAbiStatus, LastErrorIsPerThread) {
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_comm_create_local(nullptr), "out is NULL");
  const std::string main_message = mdopt_last_error();

  std::string fresh, failed;
  mdopt_status status = MDOPT_SUCCESS;
  std::thread other([&] {
    fresh = mdopt_last_error();  // nothing failed on this thread yet
    mdopt_comm* comm = nullptr;
    if (mdopt_comm_create_local(&comm) != MDOPT_SUCCESS) return;
    mdopt_optimizer* opt = nullptr;
    status = mdopt_create(comm, "no_such_option=1", &opt);
    failed = mdopt_last_error();
    mdopt_comm_destroy(comm);
  });
  other.join();

  EXPECT_EQ(fresh, "");
  EXPECT_EQ(status, MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(failed.find("no_such_option"), std::string::npos) << failed;
  // The other thread's failure and its later successful call left ours alone.
  EXPECT_EQ(std::string(mdopt_last_error()), main_message);
}

// --- communicators and create/destroy ----------------------------------------------------

TEST(CAbiComm, NullArguments) {
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_comm_create_local(nullptr), "out");
  mdopt_comm* comm = nullptr;
  MDOPT_ASSERT_OK(mdopt_comm_create_local(&comm));
  int rank = -7, size = -7;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_comm_rank(nullptr, &rank), "comm");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_comm_rank(comm, nullptr), "rank");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_comm_size(nullptr, &size), "comm");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_comm_size(comm, nullptr), "size");
  EXPECT_EQ(rank, -7);
  EXPECT_EQ(size, -7);
  // Still a working communicator: rank 0 of 1.
  MDOPT_ASSERT_OK(mdopt_comm_rank(comm, &rank));
  MDOPT_ASSERT_OK(mdopt_comm_size(comm, &size));
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(size, 1);
  MDOPT_ASSERT_OK(mdopt_comm_destroy(comm));
  // comm.h and optimizer.h: NULL is accepted and ignored.
  MDOPT_ASSERT_OK(mdopt_comm_destroy(nullptr));
  MDOPT_ASSERT_OK(mdopt_destroy(nullptr));
}

TEST(CAbiCreate, NullArgumentsAndBadOptions) {
  mdopt_comm* comm = nullptr;
  MDOPT_ASSERT_OK(mdopt_comm_create_local(&comm));
  mdopt_optimizer* const untouched = reinterpret_cast<mdopt_optimizer*>(&comm);
  mdopt_optimizer* opt = untouched;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_create(nullptr, "", &opt), "comm");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_create(comm, "", nullptr), "out");
  struct Case {
    const char* options;
    mdopt_status want;
    const char* needle;
  };
  const Case cases[] = {
      {"bogus=1", MDOPT_INVALID_ARGUMENT, "'bogus'"},
      {"threads=2 colour=red", MDOPT_INVALID_ARGUMENT, "'colour'"},
      {"threads=0", MDOPT_INVALID_ARGUMENT, "threads"},
      {"threads=-2", MDOPT_INVALID_ARGUMENT, "threads"},
      {"threads=two", MDOPT_INVALID_ARGUMENT, "threads"},
      {"threads=1.5", MDOPT_INVALID_ARGUMENT, "threads"},
      {"threads=4097", MDOPT_INVALID_ARGUMENT, "threads"},
      {"kernels=bogus", MDOPT_INVALID_ARGUMENT, "kernels"},
      {"kernels=", MDOPT_INVALID_ARGUMENT, "kernels"},
      {"device=tpu", MDOPT_INVALID_ARGUMENT, "device"},
      {"device=cuda:-1", MDOPT_INVALID_ARGUMENT, "device"},
      {"device=cuda:", MDOPT_INVALID_ARGUMENT, "device"},
      {"device=", MDOPT_INVALID_ARGUMENT, "device"},
      {"ns_dtype=f16", MDOPT_INVALID_ARGUMENT, "ns_dtype"},
      {"threads=1 threads=2", MDOPT_INVALID_ARGUMENT, "'threads' is given twice"},
      {"threads", MDOPT_INVALID_ARGUMENT, "threads"},
      {"=cpu", MDOPT_INVALID_ARGUMENT, "'=cpu'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.options);
    EXPECT_MDOPT_ERROR(c.want, mdopt_create(comm, c.options, &opt), c.needle);
    EXPECT_EQ(opt, untouched) << "a failed mdopt_create wrote *out";
  }
  // Every documented option, and no options at all (the shim reads NULL as "").
  for (const char* options : {"", "device=cpu threads=1 kernels=fast", " kernels=reference\tthreads=2 ",
                              "ns_dtype=f32", static_cast<const char*>(nullptr)}) {
    opt = nullptr;
    MDOPT_ASSERT_OK(mdopt_create(comm, options, &opt));
    ASSERT_NE(opt, nullptr);
    MDOPT_ASSERT_OK(mdopt_destroy(opt));
  }
  MDOPT_ASSERT_OK(mdopt_comm_destroy(comm));
}

// --- groups ------------------------------------------------------------------------------

TEST(CAbiAddGroup, NullArgumentsBadSpecsAndBadNames) {
  Rig rig;
  ASSERT_NO_FATAL_FAILURE(rig.Create());
  mdopt_optimizer* opt = rig.opt();
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_group(nullptr, "g", "preset=vector"), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_group(opt, nullptr, "preset=vector"), "name");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_group(opt, "g", nullptr), "spec");

  // Every message names the group and the key at fault (DESIGN.md section 4).
  struct Case {
    const char* spec;
    const char* key;
  };
  const Case specs[] = {
      {"preset=md-muon foo=1", "'foo'"},
      {"preset=md-muon lr=abc", "'lr'"},
      {"preset=md-muon lr=-1", "'lr'"},
      {"preset=md-muon beta2=1", "'beta2'"},
      {"preset=md-muon ns_steps=0", "'ns_steps'"},
      {"preset=md-muon sphere=cube", "'sphere'"},
      {"preset=md-muon gains=diag", "'gains'"},
      {"preset=md-muon radius=-1", "'radius'"},
      {"preset=md-muon nesterov=maybe", "'nesterov'"},
      {"lr=0.1", "'preset'"},
      {"", "'preset'"},
      {"   ", "'preset'"},
      {"preset=md-sgd", "'preset'"},
      {"preset=md-muon lr=0.1 lr=0.2", "'lr'"},
      {"preset=md-muon weight_decay=0.1", "'weight_decay'"},
      {"preset=adamw sphere=row", "'weight_decay'"},
      {"preset=md-adamw momentum=0.9", "'momentum'"},
      {"preset=md-adamw nesterov=0", "'nesterov'"},
      {"preset=md-adamw ns_steps=3", "'ns_steps'"},
      {"preset=md-adamw ns_coeffs=jordan", "'ns_coeffs'"},
      {"preset=md-adamw muon_scale=rms", "'muon_scale'"},
      {"preset=md-muon base=adamw momentum=0.9", "'momentum'"},
      {"preset=adamh gain_lr=0.01", "'gain_lr'"},
      {"preset=md-muon gains=none gain_param=exp", "'gain_param'"},
      {"preset=vector radius=2", "'radius'"},
      {"preset=vector tangent=1", "'tangent'"},
      {"preset=md-muon sphere=none tangent=1", "'tangent'"},
      {"preset=md-muon lr", "spec:"},
  };
  for (const Case& c : specs) {
    SCOPED_TRACE(c.spec);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_group(opt, "bad", c.spec), "'bad'", c.key);
  }

  const std::string long_name(257, 'n');
  for (const std::string& name : {std::string(""), std::string("my group"), std::string("tab\tname"),
                                  std::string("new\nline"), std::string("bell\x07"), std::string("del\x7f"),
                                  long_name}) {
    SCOPED_TRACE(name);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_group(opt, name.c_str(), "preset=vector"),
                       "group name");
  }
  MDOPT_ASSERT_OK(mdopt_add_group(opt, std::string(256, 'n').c_str(), "preset=vector"));

  MDOPT_ASSERT_OK(mdopt_add_group(opt, "mat", "preset=md-muon"));
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_group(opt, "mat", "preset=vector"), "'mat'",
                     "already exists");
  // The same name with a valid spec after all those failures: nothing was half-added.
  MDOPT_ASSERT_OK(mdopt_add_group(opt, "bad", "preset=vector"));
  // Exactly the groups that succeeded exist, in order (the unknown-group message lists them).
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  float w[4] = {1, 2, 3, 4}, g[4] = {0, 0, 0, 0};
  d.name = "p";
  d.group = "nope";
  d.ndim = 1;
  d.shape[0] = 4;
  d.param = w;
  d.grad = g;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_param(opt, &d, nullptr),
                     "groups: " + std::string(256, 'n') + ", mat, bad)");
  // And the optimizer works with them.
  d.group = "bad";
  MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, nullptr));
  MDOPT_ASSERT_OK(mdopt_finalize(opt));
  g[0] = 0.5f;
  MDOPT_ASSERT_OK(mdopt_step(opt, 1.0, nullptr, nullptr));

  // A twin that made only the calls that succeeded ends with the same checkpoint, byte for
  // byte: the refused calls left no group, spec or param behind.
  mdopt_optimizer* raw = nullptr;
  MDOPT_ASSERT_OK(mdopt_create(rig.comm(), "threads=1", &raw));
  OptimizerPtr twin(raw, mdopt_destroy);
  float tw[4] = {1, 2, 3, 4}, tg[4] = {0.5f, 0, 0, 0};
  MDOPT_ASSERT_OK(mdopt_add_group(twin.get(), std::string(256, 'n').c_str(), "preset=vector"));
  MDOPT_ASSERT_OK(mdopt_add_group(twin.get(), "mat", "preset=md-muon"));
  MDOPT_ASSERT_OK(mdopt_add_group(twin.get(), "bad", "preset=vector"));
  d.param = tw;
  d.grad = tg;
  MDOPT_ASSERT_OK(mdopt_add_param(twin.get(), &d, nullptr));
  MDOPT_ASSERT_OK(mdopt_finalize(twin.get()));
  MDOPT_ASSERT_OK(mdopt_step(twin.get(), 1.0, nullptr, nullptr));
  TempDir tmp;
  EXPECT_EQ(CheckpointBytes(opt, tmp / "a"), CheckpointBytes(twin.get(), tmp / "twin"));
  EXPECT_EQ(0, std::memcmp(w, tw, sizeof w));
}

// --- params ------------------------------------------------------------------------------

TEST(CAbiAddParam, NullArgumentsBadNamesShapesAndDtypes) {
  Rig rig;
  ASSERT_NO_FATAL_FAILURE(rig.Create());
  ASSERT_NO_FATAL_FAILURE(rig.AddGroups());
  mdopt_optimizer* opt = rig.opt();
  std::vector<float> w(12, 0.5f), g(12, 0.0f), w2(12, 0.25f), g2(12, 0.0f);
  std::vector<uint16_t> wh(12, kernels::FloatToBf16(0.5f));
  auto valid = [&] {
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = "p";
    d.group = "mat";
    d.ndim = 2;
    d.shape[0] = 4;
    d.shape[1] = 3;
    d.param_dtype = F32;
    d.param = w.data();
    d.grad_dtype = F32;
    d.grad = g.data();
    return d;
  };
  const int64_t sentinel = -12345;
  int64_t index = sentinel;
  mdopt_param_desc d = valid();
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_param(nullptr, &d, &index), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_param(opt, nullptr, &index), "desc");
  EXPECT_EQ(index, sentinel);

  const std::string long_name(257, 'n');
  struct Case {
    const char* what;
    std::function<void(mdopt_param_desc*)> mutate;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"struct_size 0", [](mdopt_param_desc* d) { d->struct_size = 0; },
       {"struct_size = 0", "sizeof(mdopt_param_desc)"}},
      {"struct_size short", [](mdopt_param_desc* d) { d->struct_size = MDOPT_PARAM_DESC_SIZE_V1 - 1; },
       {"struct_size"}},
      {"struct_size of one field", [](mdopt_param_desc* d) { d->struct_size = sizeof(size_t); },
       {"struct_size"}},
      {"struct_size one below v1",
       [](mdopt_param_desc* d) { d->struct_size = MDOPT_PARAM_DESC_SIZE_V1 - 1; },
       {"mdopt_param_desc", std::to_string(MDOPT_PARAM_DESC_SIZE_V1 - 1),
        "[" + std::to_string(MDOPT_PARAM_DESC_SIZE_V1) + ", 65536]"}},
      {"struct_size absurd", [](mdopt_param_desc* d) { d->struct_size = size_t{1} << 40; },
       {"struct_size = 1099511627776", "mdopt_param_desc", "65536"}},
      {"struct_size just above 64 KiB",
       [](mdopt_param_desc* d) { d->struct_size = MDOPT_STRUCT_SIZE_MAX + 1; }, {"65537"}},
      {"name NULL", [](mdopt_param_desc* d) { d->name = nullptr; }, {"desc->name is NULL"}},
      {"group NULL", [](mdopt_param_desc* d) { d->group = nullptr; }, {"desc->group is NULL"}},
      {"param NULL", [](mdopt_param_desc* d) { d->param = nullptr; }, {"'p'", "param pointer is NULL"}},
      {"empty name", [](mdopt_param_desc* d) { d->name = ""; }, {"param name"}},
      {"name with a space", [](mdopt_param_desc* d) { d->name = "my param"; },
       {"'my param'", "whitespace"}},
      {"name with a tab", [](mdopt_param_desc* d) { d->name = "my\tparam"; }, {"whitespace"}},
      {"name with a control character", [](mdopt_param_desc* d) { d->name = "p\x1b"; }, {"control"}},
      {"name of 257 characters", [&](mdopt_param_desc* d) { d->name = long_name.c_str(); },
       {"1 to 256"}},
      {"unknown group", [](mdopt_param_desc* d) { d->group = "nope"; },
       {"'p'", "'nope'", "groups: mat, emb, vec"}},
      {"empty group", [](mdopt_param_desc* d) { d->group = ""; }, {"group ''"}},
      {"ndim 0", [](mdopt_param_desc* d) { d->ndim = 0; }, {"'p'", "ndim 0"}},
      {"ndim 4", [](mdopt_param_desc* d) { d->ndim = 4; }, {"'p'", "ndim 4"}},
      {"ndim -1", [](mdopt_param_desc* d) { d->ndim = -1; }, {"'p'", "ndim -1"}},
      {"zero rows", [](mdopt_param_desc* d) { d->shape[0] = 0; }, {"'p'", "shape[0] = 0"}},
      {"negative columns", [](mdopt_param_desc* d) { d->shape[1] = -3; }, {"'p'", "shape[1] = -3"}},
      {"zero third dim",
       [](mdopt_param_desc* d) {
         d->ndim = 3;
         d->shape[0] = 1;
         d->shape[2] = 0;
       },
       {"'p'", "shape[2] = 0"}},
      {"side beyond a BLAS int", [](mdopt_param_desc* d) { d->shape[0] = int64_t{1} << 31; },
       {"'p'", "shape[0] = 2147483648"}},
      {"more than 2^40 elements",
       [](mdopt_param_desc* d) {
         d->ndim = 3;
         d->shape[0] = d->shape[1] = int64_t{1} << 20;
         d->shape[2] = 2;
       },
       {"'p'", "2^40"}},
      {"param_dtype 2", [](mdopt_param_desc* d) { d->param_dtype = BadDtype(2); }, {"'p'", "param_dtype 2"}},
      {"param_dtype -1", [](mdopt_param_desc* d) { d->param_dtype = BadDtype(-1); }, {"'p'", "param_dtype -1"}},
      {"grad_dtype 7", [](mdopt_param_desc* d) { d->grad_dtype = BadDtype(7); }, {"'p'", "grad_dtype 7"}},
      {"f32 param with bf16 grad", [](mdopt_param_desc* d) { d->grad_dtype = BF16; },
       {"'p'", "grad_dtype bf16 with param_dtype f32"}},
      {"1-D param in a muon group",
       [](mdopt_param_desc* d) {
         d->ndim = 1;
         d->shape[0] = 12;
       },
       {"'p'", "1-D", "'mat'", "base=muon"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    d = valid();
    c.mutate(&d);
    index = sentinel;
    ExpectFailure(c.what, mdopt_add_param(opt, &d, &index), MDOPT_INVALID_ARGUMENT, c.needles);
    EXPECT_EQ(index, sentinel) << "a failed mdopt_add_param wrote *index_out";
  }

  // None of the failures registered anything or used up an index.
  d = valid();
  MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, &index));
  EXPECT_EQ(index, 0);
  index = sentinel;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_add_param(opt, &d, &index), "'p'", "already registered");
  EXPECT_EQ(index, sentinel);
  // optimizer.h: unused shape entries are ignored.
  d = valid();
  d.name = "q";
  d.param = w2.data();
  d.grad = g2.data();
  d.shape[2] = -7;
  MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, &index));
  EXPECT_EQ(index, 1);
  // bf16 weights with f32 gradients are the mixed-precision norm; a 1-D one goes to Adam.
  d = valid();
  d.name = "r";
  d.group = "vec";
  d.ndim = 1;
  d.shape[0] = 12;
  d.shape[1] = 0;
  d.shape[2] = -1;
  d.param_dtype = BF16;
  d.param = wh.data();
  MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, nullptr));

  MDOPT_ASSERT_OK(mdopt_finalize(opt));
  int64_t n = 0;
  MDOPT_ASSERT_OK(mdopt_get_state(opt, 1, "master", nullptr, 0, &n));
  EXPECT_EQ(n, 12);
  MDOPT_ASSERT_OK(mdopt_get_state(opt, 2, "master", nullptr, 0, &n));
  EXPECT_EQ(n, 12);
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(opt, 3, "master", nullptr, 0, &n),
                     "out of range [0, 3)");
  std::fill(g.begin(), g.end(), 0.1f);
  std::fill(g2.begin(), g2.end(), -0.1f);
  MDOPT_ASSERT_OK(mdopt_step(opt, 1.0, nullptr, nullptr));

  // A twin that registered only p, q and r (same values, its own buffers) ends with the same
  // checkpoint and weights: the refused calls left nothing behind.
  mdopt_optimizer* raw = nullptr;
  MDOPT_ASSERT_OK(mdopt_create(rig.comm(), "threads=1", &raw));
  OptimizerPtr twin(raw, mdopt_destroy);
  MDOPT_ASSERT_OK(mdopt_add_group(twin.get(), "mat", "preset=md-muon"));
  MDOPT_ASSERT_OK(mdopt_add_group(twin.get(), "emb", "preset=embedding"));
  MDOPT_ASSERT_OK(mdopt_add_group(twin.get(), "vec", "preset=vector"));
  std::vector<float> tw(12, 0.5f), tg(12, 0.1f), tw2(12, 0.25f), tg2(12, -0.1f);
  std::vector<uint16_t> twh(12, kernels::FloatToBf16(0.5f));
  d = valid();
  d.param = tw.data();
  d.grad = tg.data();
  MDOPT_ASSERT_OK(mdopt_add_param(twin.get(), &d, nullptr));
  d.name = "q";
  d.param = tw2.data();
  d.grad = tg2.data();
  MDOPT_ASSERT_OK(mdopt_add_param(twin.get(), &d, nullptr));
  d = valid();
  d.name = "r";
  d.group = "vec";
  d.ndim = 1;
  d.shape[0] = 12;
  d.param_dtype = BF16;
  d.param = twh.data();
  d.grad = tg.data();
  MDOPT_ASSERT_OK(mdopt_add_param(twin.get(), &d, nullptr));
  MDOPT_ASSERT_OK(mdopt_finalize(twin.get()));
  MDOPT_ASSERT_OK(mdopt_step(twin.get(), 1.0, nullptr, nullptr));
  TempDir tmp;
  EXPECT_EQ(CheckpointBytes(opt, tmp / "a"), CheckpointBytes(twin.get(), tmp / "twin"));
  EXPECT_EQ(w, tw);
  EXPECT_EQ(w2, tw2);
  EXPECT_EQ(wh, twh);
}

// --- life cycle ----------------------------------------------------------------------------

TEST(CAbiOrder, CallsOutOfOrderAreInvalidState) {
  TempDir tmp;
  Rig a, twin;
  ASSERT_NO_FATAL_FAILURE(a.Create());
  ASSERT_NO_FATAL_FAILURE(a.AddGroups());
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_finalize(nullptr), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_finalize(a.opt()), "no parameters");
  ASSERT_NO_FATAL_FAILURE(a.AddParams());

  // Before finalize: nothing that needs state.
  mdopt_step_info info = MDOPT_STEP_INFO_INIT;
  info.step = -5;
  int64_t bytes = -5, count = -5;
  double out[24];
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_step(a.opt(), 1.0, nullptr, &info), "mdopt_step",
                     "before mdopt_finalize");
  EXPECT_EQ(info.step, -5);
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_save(a.opt(), (tmp / "early").c_str()), "mdopt_save",
                     "before mdopt_finalize");
  EXPECT_FALSE(fs::exists(tmp / "early")) << "a refused save created its directory";
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_load(a.opt(), tmp.path().c_str()), "mdopt_load",
                     "before mdopt_finalize");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_state_bytes(a.opt(), &bytes), "mdopt_state_bytes",
                     "before mdopt_finalize");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_workspace_bytes(a.opt(), &bytes),
                     "mdopt_workspace_bytes", "before mdopt_finalize");
  EXPECT_EQ(bytes, -5);
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_get_state(a.opt(), 0, "master", out, 24, &count),
                     "mdopt_get_state", "before mdopt_finalize");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_get_state(a.opt(), 0, "master", nullptr, 0, &count),
                     "mdopt_get_state", "before mdopt_finalize");
  EXPECT_EQ(count, -5);

  MDOPT_ASSERT_OK(mdopt_finalize(a.opt()));
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());

  // After finalize: no more registration, no second finalize.
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_finalize(a.opt()), "already");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_add_group(a.opt(), "late", "preset=vector"),
                     "mdopt_add_group after mdopt_finalize");
  std::vector<float> lw(3, 1.0f), lg(3, 0.0f);
  mdopt_param_desc late = MDOPT_PARAM_DESC_INIT;
  late.name = "late";
  late.group = "vec";
  late.ndim = 1;
  late.shape[0] = 3;
  late.param = lw.data();
  late.grad = lg.data();
  int64_t index = -5;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_add_param(a.opt(), &late, &index),
                     "mdopt_add_param after mdopt_finalize");
  EXPECT_EQ(index, -5);
  EXPECT_EQ(lw, std::vector<float>(3, 1.0f));

  MDOPT_ASSERT_OK(mdopt_state_bytes(a.opt(), &bytes));
  EXPECT_GT(bytes, 0);
  MDOPT_ASSERT_OK(mdopt_workspace_bytes(a.opt(), &bytes));
  EXPECT_GE(bytes, 0);
  ASSERT_NO_FATAL_FAILURE(ExpectTwinsAfterSteps(a, twin, 1, 2, "after calls out of order"));

  // The whole state, moments and step count included, through checkpoints: the refused
  // group and param left no trace in the manifest either.
  EXPECT_EQ(CheckpointBytes(a.opt(), tmp / "a"), CheckpointBytes(twin.opt(), tmp / "twin"));
}

// --- step ----------------------------------------------------------------------------------

TEST(CAbiStep, BadArguments) {
  Rig a, twin;
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());
  a.SetGradients(1);
  const auto before = a.Snapshot();

  mdopt_step_info info{};
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(nullptr, 1.0, nullptr, nullptr), "opt");
  info.struct_size = 0;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), 1.0, nullptr, &info),
                     "struct_size = 0", "sizeof(mdopt_step_info)");
  // (sizeof info - 1 lies between the v1 size and today's: a caller built against an
  // intermediate header, accepted; the versioning test covers it.)
  info.struct_size = sizeof(size_t);
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), 1.0, nullptr, &info), "struct_size");
  info.struct_size = MDOPT_STEP_INFO_SIZE_V1 - 1;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), 1.0, nullptr, &info),
                     "mdopt_step_info", "[" + std::to_string(MDOPT_STEP_INFO_SIZE_V1) + ", 65536]");
  info.struct_size = ~size_t{0};
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), 1.0, nullptr, &info),
                     "struct_size = 18446744073709551615", "65536");
  info.struct_size = sizeof info;
  for (double lr_scale : {std::nan(""), -1.0, -1e-300, std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity()}) {
    SCOPED_TRACE(lr_scale);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), lr_scale, nullptr, &info), "lr_scale");
  }
  int not_a_stream = 0;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), 1.0, &not_a_stream, &info), "stream");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_step(a.opt(), 1.0, &not_a_stream, nullptr), "stream");

  const auto after = a.Snapshot();
  EXPECT_TRUE(before == after) << "a refused mdopt_step changed the state";
  // No refused call counted as a step: the first real one is step 1 on both.
  ASSERT_NO_FATAL_FAILURE(ExpectTwinsAfterSteps(a, twin, 1, 2, "after refused steps"));
}

// optimizer.h: a NULL gradient pointer means the param has no gradient this step: it is left
// bit for bit as it was (weights, state and its step count), counted as skipped, while the
// others step as if it were not there; a gradient given back steps it again, bias-corrected
// with its own count: bit for bit as an optimizer that saw only the gradients it took.
void NullGradientSkipsTheParam(const std::string& options) {
  Rig a("preset=md-muon", options), twin("preset=md-muon", options);
  ASSERT_NO_FATAL_FAILURE(a.Create());
  ASSERT_NO_FATAL_FAILURE(a.AddGroups());
  ASSERT_NO_FATAL_FAILURE(a.AddParams());
  // "x" (bf16 expert stack with f32 gradients) has no gradient from before finalize on.
  MDOPT_ASSERT_OK(mdopt_set_pointers(a.opt(), 1, a.buf(1).param(), nullptr));
  MDOPT_ASSERT_OK(mdopt_finalize(a.opt()));
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());
  auto of = [](const std::map<std::string, std::vector<uint64_t>>& snap, const std::string& name,
               bool keep) {
    std::map<std::string, std::vector<uint64_t>> out;
    for (const auto& [key, bits] : snap)
      if ((key.rfind(name + ".", 0) == 0) == keep) out[key] = bits;
    return out;
  };

  for (int step = 1; step <= 2; ++step) {
    SCOPED_TRACE(step);
    // "b" (a vector) has none at step 2 either, set after finalize.
    if (step == 2) MDOPT_ASSERT_OK(mdopt_set_pointers(a.opt(), 3, a.buf(3).param(), nullptr));
    a.SetGradients(step);
    const auto before = a.Snapshot();
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(a.opt(), 1.0, nullptr, &info));
    EXPECT_EQ(info.step, step);
    EXPECT_EQ(info.skipped, 0);
    ASSERT_NO_FATAL_FAILURE(twin.Step(step));
    const auto after = a.Snapshot(), other = twin.Snapshot();
    EXPECT_EQ(of(after, "x", true), of(before, "x", true)) << "'x' changed without a gradient";
    if (step == 2) {
      EXPECT_EQ(of(after, "b", true), of(before, "b", true)) << "'b' changed";
    }
    // The params with a gradient: bit for bit the twin's, whose 'x' (and 'b') stepped too.
    for (const auto& [key, bits] : after) {
      if (key.rfind("x.", 0) == 0 || (step == 2 && key.rfind("b.", 0) == 0)) continue;
      EXPECT_EQ(bits, other.at(key)) << key;
    }
    mdopt_group_stats mat = MDOPT_GROUP_STATS_INIT, vec = MDOPT_GROUP_STATS_INIT;
    MDOPT_ASSERT_OK(mdopt_group_info(a.opt(), "mat", &mat));
    MDOPT_ASSERT_OK(mdopt_group_info(a.opt(), "vec", &vec));
    EXPECT_EQ(mat.matrices, 3);
    EXPECT_EQ(mat.skipped, 2);  // x's two experts
    EXPECT_EQ(mat.orthogonalized, 1);
    EXPECT_EQ(mat.projected, 1);
    EXPECT_EQ(vec.skipped, step == 2 ? 1 : 0);
  }
  // The gradients back: 'x' and 'b' step again.
  MDOPT_ASSERT_OK(mdopt_set_pointers(a.opt(), 1, a.buf(1).param(), a.buf(1).grad()));
  MDOPT_ASSERT_OK(mdopt_set_pointers(a.opt(), 3, a.buf(3).param(), a.buf(3).grad()));
  a.SetGradients(3);
  const auto before = a.Snapshot();
  MDOPT_ASSERT_OK(mdopt_step(a.opt(), 1.0, nullptr, nullptr));
  const auto after_three = a.Snapshot();
  EXPECT_NE(after_three.at("x.model"), before.at("x.model"));
  mdopt_group_stats mat = MDOPT_GROUP_STATS_INIT;
  MDOPT_ASSERT_OK(mdopt_group_info(a.opt(), "mat", &mat));
  EXPECT_EQ(mat.skipped, 0);
  EXPECT_EQ(mat.orthogonalized, 3);

  // Each param's own count: 'x' took step 3 only, 'b' steps 1 and 3, the others all three.
  const std::map<std::string, double> counts = {{"w", 3}, {"x", 1}, {"e", 3}, {"b", 2}, {"h", 3}};
  const std::vector<TensorDef> defs = StandardModel();
  for (size_t i = 0; i < defs.size(); ++i) {
    double t = -1;
    int64_t n = 0;
    MDOPT_ASSERT_OK(mdopt_get_state(a.opt(), static_cast<int64_t>(i), "step", &t, 1, &n));
    EXPECT_EQ(n, 1);
    EXPECT_EQ(t, counts.at(defs[i].name)) << defs[i].name;
  }
  // 'x' after its one step (the gradient of step 3) is what a fresh optimizer's first step
  // with that gradient makes; 'b' after its two (gradients of steps 1 and 3) a fresh one's
  // two steps: the same bias corrections 1/(1 - beta^t), t = 1 and 2, not the optimizer's 3.
  Rig once("preset=md-muon", options), twice("preset=md-muon", options);
  ASSERT_NO_FATAL_FAILURE(once.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(twice.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(once.Step(3));
  ASSERT_NO_FATAL_FAILURE(twice.Step(1));
  ASSERT_NO_FATAL_FAILURE(twice.Step(3));
  EXPECT_EQ(of(after_three, "x", true), of(once.Snapshot(), "x", true));
  EXPECT_EQ(of(after_three, "b", true), of(twice.Snapshot(), "b", true));
}
TEST(CAbiStep, NullGradientSkipsTheParam) { NullGradientSkipsTheParam("threads=1"); }
TEST(CAbiStep, NullGradientSkipsTheParamReference) {
  NullGradientSkipsTheParam("threads=1 kernels=reference");
}

// --- set_pointers ----------------------------------------------------------------------------

TEST(CAbiSetPointers, BadIndexAndNullParam) {
  Rig a, twin;
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(a.Step(1));
  ASSERT_NO_FATAL_FAILURE(twin.Step(1));

  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT,
                     mdopt_set_pointers(nullptr, 0, a.buf(0).param(), a.buf(0).grad()), "opt");
  for (int64_t index : {int64_t{-1}, int64_t{5}, std::numeric_limits<int64_t>::max(),
                        std::numeric_limits<int64_t>::min()}) {
    SCOPED_TRACE(index);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT,
                       mdopt_set_pointers(a.opt(), index, a.buf(0).param(), a.buf(0).grad()),
                       "out of range [0, 5)");
  }
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_set_pointers(a.opt(), 2, nullptr, a.buf(2).grad()),
                     "'e'", "param pointer is NULL");
  ASSERT_NO_FATAL_FAILURE(ExpectSameState(a, twin, "after refused mdopt_set_pointers"));

  // Valid use: "w" (f32, its buffer is the master copy) and "e" (bf16) move to new buffers
  // that hold the current weights, with new gradient buffers.
  std::vector<float> w_new = a.buf(0).param_f32;
  std::vector<uint16_t> e_new = a.buf(2).param_bf16;
  a.SetGradients(2);
  std::vector<float> wg_new = a.buf(0).grad_f32;
  std::vector<uint16_t> eg_new = a.buf(2).grad_bf16;
  // The old gradient buffers now hold junk: a step that still read them would differ.
  std::fill(a.buf(0).grad_f32.begin(), a.buf(0).grad_f32.end(), 100.0f);
  std::fill(a.buf(2).grad_bf16.begin(), a.buf(2).grad_bf16.end(), kernels::FloatToBf16(100.0f));
  MDOPT_ASSERT_OK(mdopt_set_pointers(a.opt(), 0, w_new.data(), wg_new.data()));
  MDOPT_ASSERT_OK(mdopt_set_pointers(a.opt(), 2, e_new.data(), eg_new.data()));
  const std::vector<uint64_t> w_old = a.ModelBits(0), e_old = a.ModelBits(2);
  MDOPT_ASSERT_OK(mdopt_step(a.opt(), 1.0, nullptr, nullptr));
  ASSERT_NO_FATAL_FAILURE(twin.Step(2));
  EXPECT_EQ(a.ModelBits(0), w_old) << "the step wrote the old buffer of 'w'";
  EXPECT_EQ(a.ModelBits(2), e_old) << "the step wrote the old buffer of 'e'";
  // Copy the new buffers over the old ones so that the snapshot compares what was written.
  a.buf(0).param_f32 = w_new;
  a.buf(2).param_bf16 = e_new;
  ASSERT_NO_FATAL_FAILURE(ExpectSameState(a, twin, "after stepping on new buffers"));
}

// --- get_state -------------------------------------------------------------------------------

TEST(CAbiGetState, BadArguments) {
  Rig a, twin;
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(a.Step(1));
  ASSERT_NO_FATAL_FAILURE(twin.Step(1));
  const mdopt_optimizer* opt = a.opt();
  constexpr double kSentinel = 12345.0;
  std::vector<double> out(64, kSentinel);
  int64_t count = 0;

  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(nullptr, 0, "master", out.data(), 24, &count), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(opt, 0, nullptr, out.data(), 24, &count), "field");
  for (const char* field : {"momentum_buffer", "exp_avgs", "Master", "", "master "}) {
    SCOPED_TRACE(field);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(opt, 0, field, out.data(), 24, &count),
                       "field '" + std::string(field) + "'", "unknown");
  }
  // A moment the param's rule does not have (md-muon: a momentum buffer, no Adam moments).
  for (const char* field : {"exp_avg", "exp_avg_sq"}) {
    SCOPED_TRACE(field);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(opt, 0, field, out.data(), 24, &count),
                       "param 'w' has no Adam moments", "group 'mat'");
  }
  count = 0;
  MDOPT_ASSERT_OK(mdopt_get_state(opt, 0, "momentum", nullptr, 0, &count));
  EXPECT_EQ(count, 24);
  for (int64_t index : {int64_t{-1}, int64_t{5}, std::numeric_limits<int64_t>::min()}) {
    SCOPED_TRACE(index);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(opt, index, "master", out.data(), 24, &count),
                       "out of range [0, 5)");
  }
  // "w" is 6 x 4: master has 24 values.
  for (int64_t wrong : {int64_t{23}, int64_t{25}, int64_t{0}, int64_t{-1}}) {
    SCOPED_TRACE(wrong);
    EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_get_state(opt, 0, "master", out.data(), wrong, nullptr),
                       "'master'", "24 values");
  }
  struct Missing {
    int64_t index;
    const char* field;
    std::vector<std::string> needles;
  };
  const std::vector<Missing> missing = {
      {2, "gain_row", {"'e'", "row gains", "'emb'"}},
      {2, "gain_col", {"'e'", "column gains"}},
      {3, "gain_row", {"'b'", "row gains", "'vec'"}},
      {4, "gain_col", {"'h'", "column gains"}},
      {0, "gain_scalar", {"'w'", "scalar gain", "'mat'"}},
      {3, "radius", {"'b'", "sphere"}},
      {4, "radius", {"'h'", "sphere"}},
  };
  for (const Missing& m : missing) {
    SCOPED_TRACE(std::string(a.def(static_cast<size_t>(m.index)).name) + "." + m.field);
    ExpectFailure(m.field, mdopt_get_state(opt, m.index, m.field, out.data(), 64, nullptr),
                  MDOPT_INVALID_ARGUMENT, m.needles);
    ExpectFailure(m.field, mdopt_get_state(opt, m.index, m.field, nullptr, 0, &count),
                  MDOPT_INVALID_ARGUMENT, m.needles);
  }
  EXPECT_EQ(out, std::vector<double>(64, kSentinel)) << "a refused mdopt_get_state wrote to out";

  // The lengths optimizer.h documents, for the fields that exist.
  struct Length {
    int64_t index;
    const char* field;
    int64_t n;
  };
  for (const Length& l : {Length{0, "master", 24}, Length{0, "gain_row", 6}, Length{0, "gain_col", 4},
                          Length{0, "radius", 1}, Length{1, "direction", 30}, Length{1, "gain_row", 6},
                          Length{1, "gain_col", 10}, Length{1, "radius", 2}, Length{2, "radius", 5},
                          Length{3, "master", 7}, Length{4, "direction", 4}}) {
    count = -1;
    MDOPT_ASSERT_OK(mdopt_get_state(opt, l.index, l.field, nullptr, 0, &count));
    EXPECT_EQ(count, l.n) << a.def(static_cast<size_t>(l.index)).name << "." << l.field;
  }
  ASSERT_NO_FATAL_FAILURE(ExpectTwinsAfterSteps(a, twin, 2, 1, "after refused mdopt_get_state"));
}

// --- state_bytes / workspace_bytes -----------------------------------------------------------

TEST(CAbiBytes, NullArguments) {
  Rig a;
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  int64_t bytes = -5;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_state_bytes(nullptr, &bytes), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_state_bytes(a.opt(), nullptr), "bytes");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_workspace_bytes(nullptr, &bytes), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_workspace_bytes(a.opt(), nullptr), "bytes");
  EXPECT_EQ(bytes, -5);
  MDOPT_ASSERT_OK(mdopt_state_bytes(a.opt(), &bytes));
  EXPECT_GT(bytes, 0);
}

// --- save / load -----------------------------------------------------------------------------

TEST(CAbiCheckpoint, BadArgumentsAndRefusedCheckpoints) {
  TempDir tmp;
  Rig a, twin;
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(a.Step(1));
  ASSERT_NO_FATAL_FAILURE(twin.Step(1));
  const std::string dir = tmp / "ckpt";

  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_save(nullptr, dir.c_str()), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_save(a.opt(), nullptr), "dir");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_load(nullptr, dir.c_str()), "opt");
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_ARGUMENT, mdopt_load(a.opt(), nullptr), "dir");
  EXPECT_MDOPT_ERROR(MDOPT_IO_ERROR, mdopt_load(a.opt(), (tmp / "missing").c_str()), "missing");
  // A directory cannot be made under a regular file.
  std::ofstream(tmp / "file") << "not a directory";
  EXPECT_MDOPT_ERROR(MDOPT_IO_ERROR, mdopt_save(a.opt(), (tmp / "file/ckpt").c_str()), "file/ckpt");

  // A checkpoint of another layout (md-adamw has Adam moments where md-muon has momentum).
  Rig other("preset=md-adamw");
  ASSERT_NO_FATAL_FAILURE(other.BuildFinalized());
  MDOPT_ASSERT_OK(mdopt_save(other.opt(), (tmp / "other").c_str()));
  EXPECT_MDOPT_ERROR(MDOPT_IO_ERROR, mdopt_load(a.opt(), (tmp / "other").c_str()), "does not match", "'mat'");

  // A damaged one: one byte of the state file flipped.
  MDOPT_ASSERT_OK(mdopt_save(a.opt(), dir.c_str()));
  {
    const std::string rank_file = dir + "/" + testing::RankFileOf(dir);
    std::string state = ReadBytes(rank_file);
    ASSERT_GT(state.size(), 100u);
    state[state.size() / 2] ^= 0x10;
    std::ofstream(rank_file, std::ios::binary | std::ios::trunc) << state;
  }
  EXPECT_MDOPT_ERROR(MDOPT_IO_ERROR, mdopt_load(a.opt(), dir.c_str()), "checksum");

  // Nothing changed, and the step count is still 1 (the next step is step 2 on both).
  ASSERT_NO_FATAL_FAILURE(ExpectTwinsAfterSteps(a, twin, 2, 1, "after refused checkpoints"));
}

// --- weights that cannot go onto their sphere ------------------------------------------------

struct ZeroSliceCase {
  const char* name;
  const char* mat_spec;
  size_t param;
  std::function<void(Buffers*)> spoil;
  std::vector<std::string> needles;
};

const std::vector<ZeroSliceCase>& ZeroSliceCases() {
  static const auto* cases = new std::vector<ZeroSliceCase>{
      {"zero_matrix", "preset=md-muon", 0,
       [](Buffers* b) { std::fill(b->param_f32.begin(), b->param_f32.end(), 0.0f); },
       {"'w'", "the matrix", "zero or non-finite norm"}},
      {"zero_expert", "preset=md-muon", 1,
       [](Buffers* b) { std::fill(b->param_bf16.begin() + 15, b->param_bf16.end(), uint16_t{0}); },
       {"'x'", "expert 1", "zero or non-finite norm"}},
      {"zero_row_bf16", "preset=md-muon", 2,
       [](Buffers* b) { std::fill(b->param_bf16.begin() + 6, b->param_bf16.begin() + 9, uint16_t{0}); },
       {"'e'", "row 2", "zero or non-finite norm"}},
      {"zero_column", "preset=md-muon sphere=col", 0,
       [](Buffers* b) {
         for (size_t r = 0; r < 6; ++r) b->param_f32[r * 4 + 1] = 0.0f;
       },
       {"'w'", "column 1", "zero or non-finite norm"}},
      {"nan_weight", "preset=md-muon", 0,
       [](Buffers* b) { b->param_f32[5] = std::nanf(""); }, {"'w'", "non-finite"}},
      {"inf_weight_bf16_row", "preset=md-muon", 2, [](Buffers* b) { b->param_bf16[4] = kBf16Inf; },
       {"'e'", "row 1", "non-finite"}},
  };
  return *cases;
}

class CAbiZeroSlice : public ::testing::TestWithParam<std::tuple<size_t, const char*>> {};

// optimizer.h and engine.h: finalize checks every slice before it writes anything; a
// failed finalize leaves the optimizer un-finalized and still registering.
TEST_P(CAbiZeroSlice, FinalizeRefusesAndWritesNothing) {
  const ZeroSliceCase& c = ZeroSliceCases()[std::get<0>(GetParam())];
  const std::string options = std::string("threads=1 kernels=") + std::get<1>(GetParam());
  Rig a(c.mat_spec, options), twin(c.mat_spec, options);
  ASSERT_NO_FATAL_FAILURE(a.Build());
  ASSERT_NO_FATAL_FAILURE(twin.Build());
  const Buffers good = a.buf(c.param);
  c.spoil(&a.buf(c.param));
  std::vector<std::vector<uint64_t>> models;
  for (size_t i = 0; i < a.size(); ++i) models.push_back(a.ModelBits(i));

  ExpectFailure("mdopt_finalize", mdopt_finalize(a.opt()), MDOPT_INVALID_ARGUMENT, c.needles);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a.ModelBits(i), models[i]) << "a failed finalize wrote '" << a.def(i).name << "'";
  }
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_step(a.opt(), 1.0, nullptr, nullptr), "before mdopt_finalize");
  int64_t n = 0;
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_get_state(a.opt(), 0, "master", nullptr, 0, &n),
                     "before mdopt_finalize");
  // Still registering: a group can be added.
  MDOPT_ASSERT_OK(mdopt_add_group(a.opt(), "late", "preset=vector"));
  MDOPT_ASSERT_OK(mdopt_add_group(twin.opt(), "late", "preset=vector"));

  // With the weights repaired (same buffers) finalize succeeds and matches the twin.
  Buffers& b = a.buf(c.param);
  std::copy(good.param_f32.begin(), good.param_f32.end(), b.param_f32.begin());
  std::copy(good.param_bf16.begin(), good.param_bf16.end(), b.param_bf16.begin());
  MDOPT_ASSERT_OK(mdopt_finalize(a.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(twin.opt()));
  ASSERT_NO_FATAL_FAILURE(ExpectTwinsAfterSteps(a, twin, 1, 2, "after a refused finalize"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CAbiZeroSlice,
    ::testing::Combine(::testing::Range(size_t{0}, ZeroSliceCases().size()),
                       ::testing::Values("fast", "reference")),
    [](const ::testing::TestParamInfo<std::tuple<size_t, const char*>>& info) {
      return std::string(ZeroSliceCases()[std::get<0>(info.param)].name) + "_" + std::get<1>(info.param);
    });

// --- non-finite gradients --------------------------------------------------------------------

struct NonFiniteCase {
  const char* name;
  size_t param;
  size_t element;
  double f32_value;   // for f32 gradients
  uint16_t bf16_bits; // for bf16 gradients
  bool nan;           // NaN (else +-Inf) reaches the gradient norm
};

const std::vector<NonFiniteCase>& NonFiniteCases() {
  const double inf = std::numeric_limits<double>::infinity();
  static const auto* cases = new std::vector<NonFiniteCase>{
      {"f32_matrix_nan", 0, 3, std::nan(""), 0, true},
      {"f32_matrix_inf", 0, 23, inf, 0, false},
      {"f32_grad_of_bf16_experts_neg_inf", 1, 29, -inf, 0, false},
      {"bf16_row_sphere_nan", 2, 4, 0, kBf16NaN, true},
      {"bf16_row_sphere_inf", 2, 14, 0, kBf16Inf, false},
      {"f32_vector_nan", 3, 0, std::nan(""), 0, true},
      {"bf16_vector_neg_inf", 4, 3, 0, kBf16NegInf, false},
  };
  return *cases;
}

class CAbiNonFinite : public ::testing::TestWithParam<std::tuple<size_t, const char*>> {};

// DESIGN.md section 1 and optimizer.h: the step is skipped, returns MDOPT_SUCCESS with
// info->skipped = 1, names the param, and changes nothing (checked through every readable
// field, the model buffers, and the checkpoint bytes, which hold the moments too).
TEST_P(CAbiNonFinite, StepIsSkippedAndNothingChanges) {
  const NonFiniteCase& c = NonFiniteCases()[std::get<0>(GetParam())];
  const std::string options = std::string("threads=1 kernels=") + std::get<1>(GetParam());
  TempDir tmp;
  Rig a("preset=md-muon", options), twin("preset=md-muon", options);
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(twin.BuildFinalized());
  ASSERT_NO_FATAL_FAILURE(a.Step(1));
  ASSERT_NO_FATAL_FAILURE(twin.Step(1));

  a.SetGradients(2);
  a.PoisonGradient(c.param, c.element, c.f32_value, c.bf16_bits);
  const auto before = a.Snapshot();
  MDOPT_ASSERT_OK(mdopt_save(a.opt(), (tmp / "before").c_str()));
  for (int attempt = 0; attempt < 2; ++attempt) {  // a second bad step is skipped as well
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    info.step = -1;
    info.skipped = -1;
    const mdopt_status status = mdopt_step(a.opt(), 1.0, nullptr, &info);
    const std::string message = mdopt_last_error();
    ASSERT_EQ(status, MDOPT_SUCCESS) << message;
    EXPECT_EQ(info.skipped, 1);
    EXPECT_EQ(info.step, 1) << "a skipped step was counted";
    if (c.nan) {
      EXPECT_TRUE(std::isnan(info.grad_norm)) << info.grad_norm;
    } else {
      EXPECT_TRUE(std::isinf(info.grad_norm) && info.grad_norm > 0) << info.grad_norm;
    }
    EXPECT_NE(message.find("'" + a.def(c.param).name + "'"), std::string::npos) << message;
  }
  EXPECT_TRUE(before == a.Snapshot()) << "a skipped step changed the state or the model";
  MDOPT_ASSERT_OK(mdopt_save(a.opt(), (tmp / "after").c_str()));
  EXPECT_EQ(ReadBytes(tmp / "before/" + testing::RankFileOf(tmp / "before")),
            ReadBytes(tmp / "after/" + testing::RankFileOf(tmp / "after")))
      << "a skipped step changed the optimizer state";
  EXPECT_EQ(ReadBytes(tmp / "before/manifest.json"), ReadBytes(tmp / "after/manifest.json"));

  // The next finite step is the twin's step 2, bit for bit.
  ASSERT_NO_FATAL_FAILURE(ExpectTwinsAfterSteps(a, twin, 2, 2, "after a skipped step"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CAbiNonFinite,
    ::testing::Combine(::testing::Range(size_t{0}, NonFiniteCases().size()),
                       ::testing::Values("fast", "reference")),
    [](const ::testing::TestParamInfo<std::tuple<size_t, const char*>>& info) {
      return std::string(NonFiniteCases()[std::get<0>(info.param)].name) + "_" + std::get<1>(info.param);
    });

// optimizer.h: "mdopt_last_error() names the first offending parameter".
TEST(CAbiNonFiniteOrder, NamesTheFirstOffendingParam) {
  Rig a;
  ASSERT_NO_FATAL_FAILURE(a.BuildFinalized());
  a.SetGradients(1);
  a.PoisonGradient(4, 0, 0, kBf16NaN);
  a.PoisonGradient(2, 1, 0, kBf16Inf);
  mdopt_step_info info = MDOPT_STEP_INFO_INIT;
  MDOPT_ASSERT_OK(mdopt_step(a.opt(), 1.0, nullptr, &info));
  const std::string message = mdopt_last_error();
  EXPECT_EQ(info.skipped, 1);
  EXPECT_EQ(info.step, 0);
  EXPECT_NE(message.find("'e'"), std::string::npos) << message;
  EXPECT_EQ(message.find("'h'"), std::string::npos) << message;
  // Without info the skip is still reported through the message.
  MDOPT_ASSERT_OK(mdopt_step(a.opt(), 1.0, nullptr, nullptr));
  EXPECT_NE(std::string(mdopt_last_error()).find("'e'"), std::string::npos);
}

}  // namespace
}  // namespace mdopt

// --- out of memory -----------------------------------------------------------------------

namespace mdopt {
namespace {

// A 2^20 x 2^18 f32 matrix (1 TiB) registers (it is under the 2^40-element limit), and its
// state cannot be allocated: mdopt_finalize answers MDOPT_OUT_OF_MEMORY, not MDOPT_INTERNAL.
// The fast engine allocates an f32 parameter's state before it reads the tensor, so the
// param pointer may point at a small buffer: it is never read.
TEST(CAbiOutOfMemory, HugeParameterAtFinalize) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "under AddressSanitizer a failed operator new aborts the process instead of "
                  "throwing std::bad_alloc";
#else
  mdopt_comm* comm = nullptr;
  MDOPT_ASSERT_OK(mdopt_comm_create_local(&comm));
  mdopt_optimizer* opt = nullptr;
  MDOPT_ASSERT_OK(mdopt_create(comm, "threads=1", &opt));
  MDOPT_ASSERT_OK(mdopt_add_group(opt, "mat", "preset=adamw"));
  std::vector<float> dummy(16, 0.0f);
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  d.name = "huge";
  d.group = "mat";
  d.ndim = 2;
  d.shape[0] = int64_t{1} << 20;
  d.shape[1] = int64_t{1} << 18;
  d.param_dtype = MDOPT_DTYPE_F32;
  d.param = dummy.data();
  d.grad_dtype = MDOPT_DTYPE_F32;
  d.grad = dummy.data();
  MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, nullptr));
  // The allocation must fail whatever the machine's overcommit policy: cap the address
  // space at 256 GiB for the call (then restore the limit).
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_AS, &saved), 0);
  rlimit capped = saved;
  const rlim_t cap = rlim_t{256} << 30;
  if (capped.rlim_cur == RLIM_INFINITY || capped.rlim_cur > cap) capped.rlim_cur = cap;
  ASSERT_EQ(setrlimit(RLIMIT_AS, &capped), 0);
  const mdopt_status finalized = mdopt_finalize(opt);
  const std::string message = mdopt_last_error();
  ASSERT_EQ(setrlimit(RLIMIT_AS, &saved), 0);
  EXPECT_EQ(finalized, MDOPT_OUT_OF_MEMORY) << mdopt_status_string(finalized) << ": " << message;
  EXPECT_EQ(message.rfind("mdopt_finalize: out of memory", 0), 0u) << message;
  EXPECT_STREQ(mdopt_status_string(MDOPT_OUT_OF_MEMORY), "MDOPT_OUT_OF_MEMORY");
  // Not finalized: a step is out of order, not a crash.
  EXPECT_MDOPT_ERROR(MDOPT_INVALID_STATE, mdopt_step(opt, 1.0, nullptr, nullptr), "before mdopt_finalize");
  MDOPT_ASSERT_OK(mdopt_destroy(opt));
  MDOPT_ASSERT_OK(mdopt_comm_destroy(comm));
#endif
}

}  // namespace
}  // namespace mdopt
