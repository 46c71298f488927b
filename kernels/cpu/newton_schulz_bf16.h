// Newton-Schulz with bfloat16 matrix products on oneDNN (AVX512-BF16 / AMX where the CPU
// has them): the precision the authors' code and torch.optim.Muon use, at about twice the
// speed of float32 GEMMs. Products accumulate in float32 and return float32; X, A and B are
// rounded to bf16 only as GEMM inputs, and the a X + B X update runs in float32. Both forms
// of newton_schulz.h: standard (newton_schulz_bf16.cc) and Gram (newton_schulz_bf16_gram.cc,
// where its rounding points are argued). Available when mdopt is built with oneDNN
// (MDOPT_HAVE_DNNL).
#ifndef MDOPT_KERNELS_CPU_NEWTON_SCHULZ_BF16_H_
#define MDOPT_KERNELS_CPU_NEWTON_SCHULZ_BF16_H_

#include <cstdint>
#include <memory>

#include "kernels/common/ns_coeffs.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels::fast {

class Bf16NewtonSchulz {
 public:
  Bf16NewtonSchulz();
  ~Bf16NewtonSchulz();
  Bf16NewtonSchulz(const Bf16NewtonSchulz&) = delete;
  Bf16NewtonSchulz& operator=(const Bf16NewtonSchulz&) = delete;

  // True when this build has oneDNN and oneDNN can run bf16 matmul on this CPU.
  static bool Available();

  // kStandard or kGram for an m x n matrix under bf16 (kAuto: see the .cc).
  static NsForm ResolveForm(NsForm form, int64_t m, int64_t n);

  // Makes room for an m x n matrix in the given form (buffers and the GEMM plans of its
  // shape); after it, Run on that shape and form allocates nothing.
  void Reserve(int64_t m, int64_t n, NsForm form = NsForm::kStandard);
  // Runs NS on x (m x n, overwritten) in the given form; returns where O is (x itself).
  float* Run(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x,
             NsForm form = NsForm::kStandard);
  int64_t bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_NEWTON_SCHULZ_BF16_H_
