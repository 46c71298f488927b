// What the multi-rank tests share: the world communicator, the test's model (tensors of
// awkward shapes, reproducible weights and gradients, an optimizer over them) and how they
// compare a sharded run with one rank.
#ifndef MDOPT_TESTS_DIST_DIST_HARNESS_H_
#define MDOPT_TESTS_DIST_DIST_HARNESS_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/optimizer.h"

namespace mdopt::dist_test {

// MPI_COMM_WORLD as a Communicator, made on first use (nullptr, with a test failure, when
// that fails).
Communicator* World();
// A barrier over World().
void Barrier();

// n draws of N(0, scale^2) from seed: the same numbers on every rank.
std::vector<double> Normal(size_t n, uint64_t seed, double scale);

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel() const;
};

// Shapes that do not divide evenly over 2, 3 or 4 ranks: odd m, m < N, 1 x n, m x 1, a 3-D
// stack, one matrix larger than all the others together; for Adam groups also a 1-D vector.
std::vector<Tensor> Tensors(bool adam);

// max |a - b| / max |b| (max |a - b| when b is all zero).
double RelMaxError(const std::vector<double>& a, const std::vector<double>& b);

// The mdopt_get_state fields a test compares (those a param lacks are refused and skipped).
inline constexpr const char* kStateFields[] = {"master", "gain_row", "gain_col", "gain_scalar",
                                               "radius", "step"};

// The worst relative error against one rank a test program saw, printed when it ends (the
// figure behind the tolerance table of docs/ARCHITECTURE.md).
class WorstError : public ::testing::Environment {
 public:
  explicit WorstError(std::string program) : program_(std::move(program)) {}
  void Record(double err) { worst_ = err > worst_ ? err : worst_; }
  void TearDown() override;

 private:
  std::string program_;
  double worst_ = 0.0;
};
// Registers one with gtest; gtest owns it.
WorstError* AddWorstErrorReport(const std::string& program);

// One optimizer (options as for mdopt_create) with one group "g" (spec) over the test's
// tensors and its own weight and gradient buffers: f32 gradients, f32 or bf16 weights
// (initial weights N(0, 1/n) per tensor, the same everywhere). Not finalized.
class TestModel {
 public:
  TestModel(Communicator* comm, const std::string& options, const std::string& spec, bool bf16,
            std::vector<Tensor> tensors = {});

  Optimizer& opt() { return *opt_; }
  size_t size() const { return tensors_.size(); }

  // Gradient of tensor i at `step`: Shared(...) plus a part of `rank`'s own; the mean over
  // ranks is what one rank is fed.
  static std::vector<double> Shared(const Tensor& t, size_t i, int step);
  static std::vector<double> Grad(const Tensor& t, size_t i, int step, int rank);
  void SetShared(int step);            // every rank the same gradient
  void SetLocal(int step, int rank);   // this rank's own
  void SetMean(int step, int world);   // the mean of `world` ranks' own
  void Poison(size_t i);               // a NaN in tensor i's gradient
  // Tensor i's gradient buffer given to the optimizer (has) or a NULL gradient: none.
  absl::Status HasGrad(size_t i, bool has);
  std::vector<float>& grad(size_t i) { return g_[i]; }
  // Before Finalize: tensor i's initial weights as a model's tensor `as` gets them (a model
  // holding a subset of another's tensors starts from the same weights).
  void InitAs(size_t i, size_t as);
  const std::vector<Tensor>& tensors() const { return tensors_; }

  // Model tensor i as it is now (bf16 widened).
  std::vector<double> Model(size_t i) const;
  // Every model tensor ("model/<name>") and every kStateFields field the params have
  // ("<name>/<field>"); collective when the optimizer is sharded.
  std::map<std::string, std::vector<double>> Everything();

 private:
  bool bf16_;
  std::unique_ptr<Optimizer> opt_;
  std::vector<Tensor> tensors_;
  std::vector<std::vector<float>> w_, g_;
  std::vector<std::vector<uint16_t>> wb_;
};

// A test name from free text: every character that is not a letter or digit becomes '_'.
std::string TestNameOf(const std::string& text);

}  // namespace mdopt::dist_test

#endif  // MDOPT_TESTS_DIST_DIST_HARNESS_H_
