// Inside of Bf16NewtonSchulz (newton_schulz_bf16.h), shared by its two forms: the oneDNN
// bf16 matmul plans, cached per shape, and the buffers. Only with oneDNN (MDOPT_HAVE_DNNL);
// included by newton_schulz_bf16.cc (standard form) and newton_schulz_bf16_gram.cc.
#ifndef MDOPT_KERNELS_CPU_NEWTON_SCHULZ_BF16_IMPL_H_
#define MDOPT_KERNELS_CPU_NEWTON_SCHULZ_BF16_IMPL_H_

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/newton_schulz_bf16.h"

namespace mdopt::kernels::fast {

inline void ToBf16(const float* src, int64_t count, uint16_t* dst) {
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (int64_t e = 0; e < count; ++e) dst[e] = FloatToBf16(src[e]);
}

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
  std::vector<uint16_t> xb, ab, bb;  // bf16 GEMM inputs: m x n, two s x s
  std::vector<uint16_t> tb, qb;      // Gram form only: two more s x s
  std::vector<float> a, a2, p;       // standard form: A, A^2 (s x s), B X (m x n); Gram: a

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

  // The products of either form for an m x n matrix: the Gram form's A_0 and O products
  // have the shapes of the standard form's A and B X, and its s x s products that of A^2.
  void Plans(int64_t m, int64_t n) {
    const bool tall = m > n;
    const int64_t s = std::min(m, n);
    if (tall) {
      Get(n, m, n, true, false);   // A = X^T X
      Get(m, n, n, false, false);  // X B (Gram: X_0 Q)
    } else {
      Get(m, n, m, false, true);   // A = X X^T
      Get(m, m, n, false, false);  // B X (Gram: Q X_0)
    }
    Get(s, s, s, false, false);    // A^2 (Gram: every s x s product)
  }

  float* StandardNs(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x);
  float* GramNs(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x);
};

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_NEWTON_SCHULZ_BF16_IMPL_H_
