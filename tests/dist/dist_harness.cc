#include "tests/dist/dist_harness.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>

#include "kernels/common/bf16.h"

namespace mdopt::dist_test {

Communicator* World() {
  static std::unique_ptr<Communicator> world = [] {
    absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
    if (!c.ok()) {
      ADD_FAILURE() << c.status();
      return std::unique_ptr<Communicator>();
    }
    return *std::move(c);
  }();
  return world.get();
}

void Barrier() { ASSERT_TRUE(BarrierBlocking(*World()).ok()); }

std::vector<double> Normal(size_t n, uint64_t seed, double scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = d(rng);
  return v;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::vector<Tensor> Tensors(bool adam) {
  std::vector<Tensor> t = {{"odd", {7, 19}}, {"small", {2, 9}},      {"row1", {1, 11}},
                           {"col1", {9, 1}}, {"experts", {3, 5, 8}}, {"big", {40, 90}}};
  if (adam) t.push_back({"vec", {13}});
  return t;
}

double RelMaxError(const std::vector<double>& a, const std::vector<double>& b) {
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(a[i] - b[i]));
    ref = std::max(ref, std::abs(b[i]));
  }
  return ref > 0 ? err / ref : err;
}

void WorstError::TearDown() {
  std::printf("%s: worst relative error vs one rank %.3g\n", program_.c_str(), worst_);
}

WorstError* AddWorstErrorReport(const std::string& program) {
  return static_cast<WorstError*>(::testing::AddGlobalTestEnvironment(new WorstError(program)));
}

TestModel::TestModel(Communicator* comm, const std::string& options, const std::string& spec,
                     bool bf16, std::vector<Tensor> tensors)
    : bf16_(bf16) {
  absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions(options);
  EXPECT_TRUE(o.ok()) << o.status();
  opt_ = std::make_unique<Optimizer>(comm, *o);
  EXPECT_TRUE(opt_->AddGroup("g", spec).ok());
  const bool adam = ParseGroupSpec(spec)->rule.base == kernels::Base::kAdamW;
  tensors_ = tensors.empty() ? Tensors(adam) : std::move(tensors);
  w_.resize(tensors_.size());
  wb_.resize(tensors_.size());
  g_.resize(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const Tensor& t = tensors_[i];
    InitAs(i, i);
    g_[i].assign(t.numel(), 0.0f);
    ParamDescription d;
    d.name = t.name;
    d.group = "g";
    d.ndim = static_cast<int>(t.shape.size());
    for (size_t k = 0; k < t.shape.size(); ++k) d.shape[k] = t.shape[k];
    d.param_dtype = bf16 ? 1 : 0;
    d.param = bf16 ? static_cast<void*>(wb_[i].data()) : w_[i].data();
    d.grad_dtype = 0;
    d.grad = g_[i].data();
    // Specs with radius=fan_in also give every other matrix a per-parameter radius scale
    // (mdopt_param_desc.radius_scale), so that both reach every rank count.
    if (spec.find("radius=fan_in") != std::string::npos && d.ndim >= 2 && i % 2 == 1) {
      d.radius_scale = 0.5;
    }
    EXPECT_TRUE(opt_->AddParam(d).ok());
  }
}

std::vector<double> TestModel::Shared(const Tensor& t, size_t i, int step) {
  return Normal(t.numel(), 1000 * step + i, 0.1);
}

std::vector<double> TestModel::Grad(const Tensor& t, size_t i, int step, int rank) {
  std::vector<double> g = Shared(t, i, step);
  const std::vector<double> own = Normal(t.numel(), 77 + 1000 * step + 31 * i + 7919 * rank, 0.05);
  for (size_t k = 0; k < g.size(); ++k) g[k] += own[k];
  return g;
}

void TestModel::SetShared(int step) {
  for (size_t i = 0; i < size(); ++i) {
    const std::vector<double> g = Shared(tensors_[i], i, step);
    std::copy(g.begin(), g.end(), g_[i].begin());
  }
}

void TestModel::SetLocal(int step, int rank) {
  for (size_t i = 0; i < size(); ++i) {
    const std::vector<double> g = Grad(tensors_[i], i, step, rank);
    std::copy(g.begin(), g.end(), g_[i].begin());
  }
}

void TestModel::SetMean(int step, int world) {
  for (size_t i = 0; i < size(); ++i) {
    std::vector<double> mean(tensors_[i].numel(), 0.0);
    for (int r = 0; r < world; ++r) {
      const std::vector<double> g = Grad(tensors_[i], i, step, r);
      for (size_t k = 0; k < g.size(); ++k) mean[k] += g[k] / world;
    }
    std::copy(mean.begin(), mean.end(), g_[i].begin());
  }
}

void TestModel::Poison(size_t i) { g_[i][g_[i].size() / 2] = NAN; }

void TestModel::InitAs(size_t i, size_t as) {
  const Tensor& t = tensors_[i];
  const std::vector<double> w0 = Normal(t.numel(), 17 + as, 1.0 / std::sqrt(double(t.shape.back())));
  w_[i].assign(w0.begin(), w0.end());
  wb_[i].clear();
  for (float f : w_[i]) wb_[i].push_back(kernels::FloatToBf16(f));
}

absl::Status TestModel::HasGrad(size_t i, bool has) {
  void* param = bf16_ ? static_cast<void*>(wb_[i].data()) : w_[i].data();
  return opt_->SetPointers(static_cast<int64_t>(i), param, has ? g_[i].data() : nullptr);
}

std::vector<double> TestModel::Model(size_t i) const {
  std::vector<double> v;
  if (bf16_) {
    for (uint16_t h : wb_[i]) v.push_back(kernels::Bf16ToFloat(h));
  } else {
    v.assign(w_[i].begin(), w_[i].end());
  }
  return v;
}

std::map<std::string, std::vector<double>> TestModel::Everything() {
  std::map<std::string, std::vector<double>> out;
  for (size_t i = 0; i < size(); ++i) {
    out["model/" + tensors_[i].name] = Model(i);
    for (const char* field : kStateFields) {
      absl::StatusOr<std::vector<double>> x = opt_->GetState(static_cast<int64_t>(i), field);
      if (x.ok()) out[tensors_[i].name + "/" + field] = *x;
    }
  }
  return out;
}

std::string TestNameOf(const std::string& text) {
  std::string n;
  for (char ch : text) n += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  return n;
}

}  // namespace mdopt::dist_test
