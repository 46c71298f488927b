#include "kernels/cpu/newton_schulz_bf16.h"

#include <algorithm>
#include <exception>

#include "kernels/cpu/newton_schulz.h"

#ifdef MDOPT_HAVE_DNNL
#include "kernels/cpu/newton_schulz_bf16_impl.h"
#endif

namespace mdopt::kernels::fast {

#ifdef MDOPT_HAVE_DNNL

Bf16NewtonSchulz::Bf16NewtonSchulz() : impl_(std::make_unique<Impl>()) {}
Bf16NewtonSchulz::~Bf16NewtonSchulz() = default;

bool Bf16NewtonSchulz::Available() {
  // oneDNN has bf16 matmul only on CPUs with AVX-512 (or AMX); elsewhere creating the
  // primitive throws. Ask once with a tiny product.
  static const bool available = [] {
    try {
      Impl probe;
      probe.Get(8, 8, 8, false, false);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

void Bf16NewtonSchulz::Reserve(int64_t m, int64_t n, NsForm form) {
  const size_t s = static_cast<size_t>(std::min(m, n));
  const size_t numel = static_cast<size_t>(m * n);
  const bool gram = ResolveForm(form, m, n) == NsForm::kGram;
  Impl& I = *impl_;
  if (I.xb.size() < numel) I.xb.resize(numel);
  if (I.ab.size() < s * s) I.ab.resize(s * s);
  if (I.bb.size() < s * s) I.bb.resize(s * s);
  if (I.a.size() < s * s) I.a.resize(s * s);
  if (gram) {  // four bf16 s x s and one float32 (O lands in x)
    if (I.tb.size() < s * s) I.tb.resize(s * s);
    if (I.qb.size() < s * s) I.qb.resize(s * s);
  } else {
    if (I.a2.size() < s * s) I.a2.resize(s * s);
    if (I.p.size() < numel) I.p.resize(numel);
  }
  I.Plans(m, n);
}

int64_t Bf16NewtonSchulz::bytes() const {
  const Impl& I = *impl_;
  return static_cast<int64_t>(2 * (I.xb.capacity() + I.ab.capacity() + I.bb.capacity() +
                                   I.tb.capacity() + I.qb.capacity()) +
                              4 * (I.a.capacity() + I.a2.capacity() + I.p.capacity()));
}

float* Bf16NewtonSchulz::Run(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x,
                             NsForm form) {
  form = ResolveForm(form, m, n);
  Reserve(m, n, form);
  NormalizeForNs(x, m * n);
  return form == NsForm::kGram ? impl_->GramNs(set, steps, m, n, x)
                               : impl_->StandardNs(set, steps, m, n, x);
}

// X_{k+1} = a X_k + B_k X_k (wide) or a X_k + X_k B_k (tall), B_k = b A_k + c A_k^2.
float* Bf16NewtonSchulz::Impl::StandardNs(NsCoeffSet set, int steps, int64_t m, int64_t n,
                                          float* x) {
  const bool tall = m > n;
  const int64_t s = std::min(m, n);
  const int64_t numel = m * n;
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    ToBf16(x, numel, xb.data());
    if (tall) {
      MatMul(Get(n, m, n, true, false), xb.data(), xb.data(), a.data());
    } else {
      MatMul(Get(m, n, m, false, true), xb.data(), xb.data(), a.data());
    }
    ToBf16(a.data(), s * s, ab.data());
    MatMul(Get(s, s, s, false, false), ab.data(), ab.data(), a2.data());
    const float cb = static_cast<float>(c.b), cc = static_cast<float>(c.c);
    for (int64_t e = 0; e < s * s; ++e) a[e] = cb * a[e] + cc * a2[e];
    ToBf16(a.data(), s * s, bb.data());
    if (tall) {
      MatMul(Get(m, n, n, false, false), xb.data(), bb.data(), p.data());
    } else {
      MatMul(Get(m, m, n, false, false), bb.data(), xb.data(), p.data());
    }
    const float ca = static_cast<float>(c.a);
    const float* bx = p.data();
#pragma omp parallel for simd schedule(static) if (numel >= (1 << 16))
    for (int64_t e = 0; e < numel; ++e) x[e] = ca * x[e] + bx[e];
  }
  return x;
}

#else  // no oneDNN: the class exists so callers compile, and says it cannot run.

struct Bf16NewtonSchulz::Impl {};
Bf16NewtonSchulz::Bf16NewtonSchulz() = default;
Bf16NewtonSchulz::~Bf16NewtonSchulz() = default;
bool Bf16NewtonSchulz::Available() { return false; }
void Bf16NewtonSchulz::Reserve(int64_t, int64_t, NsForm) {}
float* Bf16NewtonSchulz::Run(NsCoeffSet, int, int64_t, int64_t, float* x, NsForm) { return x; }
int64_t Bf16NewtonSchulz::bytes() const { return 0; }

#endif

// The float32 rule (the Gram form from aspect 2): under bf16 too the Gram form does fewer
// flops there, and its error measured no larger than the standard form's
// (newton_schulz_bf16_gram.cc).
NsForm Bf16NewtonSchulz::ResolveForm(NsForm form, int64_t m, int64_t n) {
  return ResolveNsForm(form, m, n);
}

}  // namespace mdopt::kernels::fast
