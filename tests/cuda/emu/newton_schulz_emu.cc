// NewtonSchulzRunner (kernels/cuda/newton_schulz.h) for the CUDA emulation: each matrix
// through the float64 reference (kernels/reference), rounded once to float32. The emulated
// backend is checked for what it does around Newton-Schulz (which matrices, where, in which
// batches); the cuBLASLt runner itself is tested on a GPU by cuda_newton_schulz_test.
#include <algorithm>
#include <vector>

#include "kernels/cuda/newton_schulz.h"
#include "kernels/reference/reference.h"

namespace mdopt::kernels::cuda {

struct NewtonSchulzRunner::Impl {};

NewtonSchulzRunner::NewtonSchulzRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
NewtonSchulzRunner::~NewtonSchulzRunner() = default;

DeviceStatus NewtonSchulzRunner::Create(std::unique_ptr<NewtonSchulzRunner>* out) {
  out->reset(new NewtonSchulzRunner(std::make_unique<Impl>()));
  return {};
}

NsForm NewtonSchulzRunner::Resolve(NsForm form, int64_t m, int64_t n) {
  if (form != NsForm::kAuto) return form;
  return std::max(m, n) >= 2 * std::min(m, n) ? NsForm::kGram : NsForm::kStandard;
}

int64_t NewtonSchulzRunner::WorkspaceBytes(int64_t, int64_t, int64_t, NsForm, bool) { return 256; }

DeviceStatus NewtonSchulzRunner::Prepare(int64_t batch, int64_t m, int64_t n, NsForm, bool) {
  if (batch < 1 || m < 1 || n < 1) return DeviceStatus::Error("Prepare: empty shape");
  return {};
}

DeviceStatus NewtonSchulzRunner::Run(NsCoeffSet set, int steps, int64_t batch, int64_t m,
                                     int64_t n, float* x, int64_t stride, NsForm, bool, void* workspace,
                                     int64_t workspace_bytes, void*) {
  if (workspace == nullptr || workspace_bytes < 256 || stride < m * n)
    return DeviceStatus::Error("Run: bad workspace or stride");
  std::vector<double> in(static_cast<size_t>(m * n)), out(in.size());
  for (int64_t b = 0; b < batch; ++b) {
    float* xb = x + b * stride;
    std::copy(xb, xb + m * n, in.begin());
    ref::NewtonSchulz(set, steps, m, n, in.data(), out.data());
    for (int64_t e = 0; e < m * n; ++e) xb[e] = static_cast<float>(out[e]);
  }
  return {};
}

double NewtonSchulzRunner::Flops(int, int64_t, int64_t, int64_t, NsForm) { return 0.0; }
int64_t NewtonSchulzRunner::Launches(int, int64_t, int64_t, int64_t, NsForm, bool) { return 0; }
int64_t NewtonSchulzRunner::MaxBatchPerCall() { return kMaxBatchPerCall; }
void NewtonSchulzRunner::SetMaxBatchPerCallForTesting(int64_t) {}

}  // namespace mdopt::kernels::cuda
