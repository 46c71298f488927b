#include "kernels/cpu/newton_schulz_bf16.h"

#include <algorithm>
#include <exception>
#include <map>
#include <tuple>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/newton_schulz.h"

#ifdef MDOPT_HAVE_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace mdopt::kernels::fast {

#ifdef MDOPT_HAVE_DNNL

namespace {

void ToBf16(const float* src, int64_t count, uint16_t* dst) {
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (int64_t e = 0; e < count; ++e) dst[e] = FloatToBf16(src[e]);
}

}  // namespace

struct Bf16NewtonSchulz::Impl {
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;

  // C (M x N, f32) = A (M x K, bf16) * B (K x N, bf16); an operand stored transposed
  // (row-major in the other orientation) is described with format tag ba, so no copy.
  struct Plan {
    dnnl::matmul prim;
    dnnl::memory::desc a, b, c;
  };
  using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool>;

  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<Key, Plan> plans;
  std::vector<uint16_t> xb, ab, bb;
  std::vector<float> a, a2, p;

  Plan& Get(int64_t m, int64_t k, int64_t n, bool a_transposed, bool b_transposed) {
    const Key key{m, k, n, a_transposed, b_transposed};
    auto it = plans.find(key);
    if (it != plans.end()) return it->second;
    Plan plan;
    plan.a = dnnl::memory::desc({m, k}, dt::bf16, a_transposed ? tag::ba : tag::ab);
    plan.b = dnnl::memory::desc({k, n}, dt::bf16, b_transposed ? tag::ba : tag::ab);
    plan.c = dnnl::memory::desc({m, n}, dt::f32, tag::ab);
    const dnnl::matmul::desc desc(plan.a, plan.b, plan.c);
    plan.prim = dnnl::matmul(dnnl::matmul::primitive_desc(desc, engine));
    return plans.emplace(key, std::move(plan)).first->second;
  }

  void MatMul(Plan& plan, const uint16_t* a_data, const uint16_t* b_data, float* c_data) {
    dnnl::memory am(plan.a, engine, const_cast<uint16_t*>(a_data));
    dnnl::memory bm(plan.b, engine, const_cast<uint16_t*>(b_data));
    dnnl::memory cm(plan.c, engine, c_data);
    plan.prim.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    stream.wait();
  }

  // The three products of one iteration for an m x n matrix.
  void Plans(int64_t m, int64_t n) {
    const bool tall = m > n;
    const int64_t s = std::min(m, n);
    if (tall) {
      Get(n, m, n, true, false);   // A = X^T X
      Get(m, n, n, false, false);  // P = X B
    } else {
      Get(m, n, m, false, true);   // A = X X^T
      Get(m, m, n, false, false);  // P = B X
    }
    Get(s, s, s, false, false);    // A^2
  }
};

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

void Bf16NewtonSchulz::Reserve(int64_t m, int64_t n) {
  const size_t s = static_cast<size_t>(std::min(m, n));
  const size_t numel = static_cast<size_t>(m * n);
  Impl& I = *impl_;
  if (I.xb.size() < numel) I.xb.resize(numel);
  if (I.p.size() < numel) I.p.resize(numel);
  if (I.ab.size() < s * s) I.ab.resize(s * s);
  if (I.bb.size() < s * s) I.bb.resize(s * s);
  if (I.a.size() < s * s) I.a.resize(s * s);
  if (I.a2.size() < s * s) I.a2.resize(s * s);
  I.Plans(m, n);
}

int64_t Bf16NewtonSchulz::bytes() const {
  const Impl& I = *impl_;
  return static_cast<int64_t>(2 * (I.xb.capacity() + I.ab.capacity() + I.bb.capacity()) +
                              4 * (I.a.capacity() + I.a2.capacity() + I.p.capacity()));
}

float* Bf16NewtonSchulz::Run(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x) {
  Reserve(m, n);
  Impl& I = *impl_;
  const bool tall = m > n;
  const int64_t s = std::min(m, n);
  const int64_t numel = m * n;
  NormalizeForNs(x, numel);
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    ToBf16(x, numel, I.xb.data());
    if (tall) {
      I.MatMul(I.Get(n, m, n, true, false), I.xb.data(), I.xb.data(), I.a.data());
    } else {
      I.MatMul(I.Get(m, n, m, false, true), I.xb.data(), I.xb.data(), I.a.data());
    }
    ToBf16(I.a.data(), s * s, I.ab.data());
    I.MatMul(I.Get(s, s, s, false, false), I.ab.data(), I.ab.data(), I.a2.data());
    const float cb = static_cast<float>(c.b), cc = static_cast<float>(c.c);
    for (int64_t e = 0; e < s * s; ++e) I.a[e] = cb * I.a[e] + cc * I.a2[e];
    ToBf16(I.a.data(), s * s, I.bb.data());
    if (tall) {
      I.MatMul(I.Get(m, n, n, false, false), I.xb.data(), I.bb.data(), I.p.data());
    } else {
      I.MatMul(I.Get(m, m, n, false, false), I.bb.data(), I.xb.data(), I.p.data());
    }
    const float ca = static_cast<float>(c.a);
    const float* p = I.p.data();
#pragma omp parallel for simd schedule(static) if (numel >= (1 << 16))
    for (int64_t e = 0; e < numel; ++e) x[e] = ca * x[e] + p[e];
  }
  return x;
}

#else  // no oneDNN: the class exists so callers compile, and says it cannot run.

struct Bf16NewtonSchulz::Impl {};
Bf16NewtonSchulz::Bf16NewtonSchulz() = default;
Bf16NewtonSchulz::~Bf16NewtonSchulz() = default;
bool Bf16NewtonSchulz::Available() { return false; }
void Bf16NewtonSchulz::Reserve(int64_t, int64_t) {}
float* Bf16NewtonSchulz::Run(NsCoeffSet, int, int64_t, int64_t, float* x) { return x; }
int64_t Bf16NewtonSchulz::bytes() const { return 0; }

#endif

}  // namespace mdopt::kernels::fast
