#include "kernels/cuda/newton_schulz.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/cuda/cuda_check.h"

namespace mdopt::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunks = 64;                  // norm partials per matrix
constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLASLt's, as cuBLAS itself uses on Hopper

// Partial sums of squares: block (c, b) sums chunk c of matrix b in float64, a fixed tree.
__global__ void SumSquaresKernel(const float* __restrict x, int64_t per, int chunks,
                                 double* __restrict partial) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t begin = per * c / chunks, end = per * (c + 1) / chunks;
  const float* xb = x + b * per;
  double acc = 0.0;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const double v = xb[e];
    acc += v * v;
  }
  __shared__ double red[kThreads];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[b * chunks + c] = red[0];
}

// X / (||X||_F + eps), rounded to bf16 (the project's one rounding, kernels/common/bf16.h).
__global__ void NormaliseKernel(const float* __restrict x, int64_t per, int chunks,
                                const double* __restrict partial, uint16_t* __restrict out) {
  const int64_t b = blockIdx.y;
  __shared__ float scale;
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    scale = static_cast<float>(1.0 / (sqrt(total) + kNsNormEps));
  }
  __syncthreads();
  const float* xb = x + b * per;
  uint16_t* ob = out + b * per;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < per;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    ob[e] = FloatToBf16(xb[e] * scale);
  }
}

// One strided-batched GEMM D = alpha op(A) op(B) + beta C of fixed shapes, its algorithm
// chosen once.
struct Gemm {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};

  ~Gemm() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// A column-major rows x cols bf16 matrix with leading dimension rows, `batch` of them
// `rows * cols` apart.
DeviceStatus MakeLayout(int64_t rows, int64_t cols, int64_t batch, cublasLtMatrixLayout_t* out) {
  MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(out, CUDA_R_16BF, rows, cols, rows));
  const int32_t count = static_cast<int32_t>(batch);
  const int64_t stride = rows * cols;
  MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(
      *out, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
  MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(
      *out, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
  return {};
}

// The alignment in bytes of every matrix of a bf16 batch `elements` apart (the base is
// cudaMalloc's, 256-byte aligned): the largest power of two dividing the stride, up to 256.
uint32_t BatchAlignment(int64_t elements) {
  const uint64_t bytes = static_cast<uint64_t>(elements) * 2;
  const uint64_t low = bytes & (~bytes + 1);
  return static_cast<uint32_t>(std::min<uint64_t>(low == 0 ? 256 : low, 256));
}

// op(A) is (a_rows x a_cols stored, transposed when ta), likewise B; C and D are c_rows x
// c_cols.
DeviceStatus MakeGemm(cublasLtHandle_t h, bool ta, int64_t a_rows, int64_t a_cols, bool tb,
                      int64_t b_rows, int64_t b_cols, int64_t c_rows, int64_t c_cols,
                      int64_t batch, Gemm* g) {
  MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&g->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  MDOPT_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(g->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
  MDOPT_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescSetAttribute(g->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
  if (DeviceStatus s = MakeLayout(a_rows, a_cols, batch, &g->a); !s.ok()) return s;
  if (DeviceStatus s = MakeLayout(b_rows, b_cols, batch, &g->b); !s.ok()) return s;
  if (DeviceStatus s = MakeLayout(c_rows, c_cols, batch, &g->c); !s.ok()) return s;
  cublasLtMatmulPreference_t pref = nullptr;
  MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  // Matrix k of a batch starts k * rows * cols elements after a 256-byte aligned base, so
  // for odd shapes it is less aligned than the 256 bytes cuBLASLt assumes by default: tell
  // the heuristic, so that it picks only algorithms that work at that alignment.
  const uint32_t align_a = BatchAlignment(a_rows * a_cols), align_b = BatchAlignment(b_rows * b_cols),
                 align_c = BatchAlignment(c_rows * c_cols);
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
  for (const auto& [attr, value] : aligns)
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof value);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(h, g->desc, g->a, g->b, g->c, g->c, pref, 1, &result,
                                        &found);
  cublasLtMatmulPreferenceDestroy(pref);
  MDOPT_CUBLAS_RETURN_IF_ERROR(st);
  if (found < 1)
    return DeviceStatus::Error("cuBLASLt has no bf16 GEMM algorithm for " +
                               std::to_string(c_rows) + " x " + std::to_string(c_cols) +
                               " (batch " + std::to_string(batch) + ")");
  g->algo = result.algo;
  return {};
}

}  // namespace

struct BatchedNewtonSchulz::Impl {
  int64_t batch = 0, m = 0, n = 0, r = 0;
  std::vector<NsTuple> coeffs;
  int chunks = 1;
  cublasLtHandle_t handle = nullptr;
  float* x = nullptr;               // batch x m x n f32 input
  uint16_t* z[2] = {nullptr, nullptr};  // ping-pong bf16 iterates
  uint16_t* a = nullptr;            // batch x r x r
  uint16_t* b = nullptr;            // batch x r x r
  double* partial = nullptr;        // batch x chunks
  void* workspace = nullptr;
  Gemm gram, poly, update;
  int64_t bytes = 0;

  ~Impl() {
    for (void* p : {static_cast<void*>(x), static_cast<void*>(z[0]), static_cast<void*>(z[1]),
                    static_cast<void*>(a), static_cast<void*>(b), static_cast<void*>(partial),
                    workspace})
      if (p) cudaFree(p);
    if (handle) cublasLtDestroy(handle);
  }

  DeviceStatus Alloc(void** p, size_t size) {
    MDOPT_CUDA_RETURN_IF_ERROR(cudaMalloc(p, std::max<size_t>(size, 1)));
    bytes += static_cast<int64_t>(size);
    return {};
  }
};

BatchedNewtonSchulz::BatchedNewtonSchulz(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BatchedNewtonSchulz::~BatchedNewtonSchulz() = default;

DeviceStatus BatchedNewtonSchulz::Create(int64_t batch, int64_t m, int64_t n, NsCoeffSet set,
                                         int steps, std::unique_ptr<BatchedNewtonSchulz>* out) {
  if (batch < 1 || m < 1 || n < 1 || steps < 1)
    return DeviceStatus::Error("Newton-Schulz needs batch, m, n and steps >= 1");
  if (batch > INT32_MAX) return DeviceStatus::Error("Newton-Schulz batch too large");
  auto impl = std::make_unique<Impl>();
  Impl& s = *impl;
  s.batch = batch;
  s.m = m;
  s.n = n;
  s.r = std::min(m, n);
  for (int k = 0; k < steps; ++k) s.coeffs.push_back(NsCoefficients(set, k));
  const int64_t per = m * n;
  s.chunks = static_cast<int>(std::clamp<int64_t>(per / (kThreads * 16), 1, kMaxChunks));
  MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&s.handle));
  const size_t xb = static_cast<size_t>(batch * per);
  const size_t ab = static_cast<size_t>(batch * s.r * s.r);
  if (DeviceStatus st = s.Alloc(reinterpret_cast<void**>(&s.x), xb * sizeof(float)); !st.ok()) return st;
  for (uint16_t*& zz : s.z)
    if (DeviceStatus st = s.Alloc(reinterpret_cast<void**>(&zz), xb * 2); !st.ok()) return st;
  if (DeviceStatus st = s.Alloc(reinterpret_cast<void**>(&s.a), ab * 2); !st.ok()) return st;
  if (DeviceStatus st = s.Alloc(reinterpret_cast<void**>(&s.b), ab * 2); !st.ok()) return st;
  if (DeviceStatus st = s.Alloc(reinterpret_cast<void**>(&s.partial),
                                static_cast<size_t>(batch * s.chunks) * sizeof(double));
      !st.ok())
    return st;
  if (DeviceStatus st = s.Alloc(&s.workspace, kWorkspaceBytes); !st.ok()) return st;
  // Column-major view of row-major X: Xc is n x m. Wide (m <= n): Z = X, whose column-major
  // form is Xc; A = Xc^T Xc (m x m), Z' = Xc B + a Xc. Tall: Z = X^T = Xc (n x m) itself;
  // A = Xc Xc^T (n x n), Z' = B Xc + a Xc.
  const int64_t r = s.r;
  DeviceStatus st;
  if (m <= n) {
    st = MakeGemm(s.handle, true, n, m, false, n, m, m, m, batch, &s.gram);
    if (st.ok()) st = MakeGemm(s.handle, false, m, m, false, m, m, m, m, batch, &s.poly);
    if (st.ok()) st = MakeGemm(s.handle, false, n, m, false, m, m, n, m, batch, &s.update);
  } else {
    st = MakeGemm(s.handle, false, n, m, true, n, m, n, n, batch, &s.gram);
    if (st.ok()) st = MakeGemm(s.handle, false, r, r, false, r, r, r, r, batch, &s.poly);
    if (st.ok()) st = MakeGemm(s.handle, false, n, n, false, n, m, n, m, batch, &s.update);
  }
  if (!st.ok()) return st;
  out->reset(new BatchedNewtonSchulz(std::move(impl)));
  return {};
}

float* BatchedNewtonSchulz::input() const { return impl_->x; }
const uint16_t* BatchedNewtonSchulz::output() const {
  return impl_->z[impl_->coeffs.size() % 2];
}
int64_t BatchedNewtonSchulz::batch() const { return impl_->batch; }
int64_t BatchedNewtonSchulz::device_bytes() const { return impl_->bytes; }
int BatchedNewtonSchulz::launches() const { return 2 + 3 * static_cast<int>(impl_->coeffs.size()); }

double BatchedNewtonSchulz::flops() const {
  const Impl& s = *impl_;
  const double r = static_cast<double>(s.r), c = static_cast<double>(std::max(s.m, s.n));
  const double per_iter = 2.0 * r * r * c + 2.0 * r * r * r + 2.0 * r * r * c;
  return per_iter * static_cast<double>(s.coeffs.size()) * static_cast<double>(s.batch);
}

DeviceStatus BatchedNewtonSchulz::Run(void* stream_ptr) {
  Impl& s = *impl_;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t per = s.m * s.n;
  const dim3 sum_grid(static_cast<unsigned>(s.chunks), static_cast<unsigned>(s.batch));
  SumSquaresKernel<<<sum_grid, kThreads, 0, stream>>>(s.x, per, s.chunks, s.partial);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const unsigned norm_blocks =
      static_cast<unsigned>(std::clamp<int64_t>((per + kThreads * 8 - 1) / (kThreads * 8), 1, 4096));
  NormaliseKernel<<<dim3(norm_blocks, static_cast<unsigned>(s.batch)), kThreads, 0, stream>>>(
      s.x, per, s.chunks, s.partial, s.z[0]);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  for (size_t k = 0; k < s.coeffs.size(); ++k) {
    const uint16_t* zin = s.z[k % 2];
    uint16_t* zout = s.z[(k + 1) % 2];
    const float one = 1.0f, zero = 0.0f;
    const float a = static_cast<float>(s.coeffs[k].a), b = static_cast<float>(s.coeffs[k].b),
                c = static_cast<float>(s.coeffs[k].c);
    // A = Z Z^T
    MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(s.handle, s.gram.desc, &one, zin, s.gram.a, zin,
                                                s.gram.b, &zero, s.a, s.gram.c, s.a, s.gram.c,
                                                &s.gram.algo, s.workspace, kWorkspaceBytes, stream));
    // B = c A A + b A
    MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(s.handle, s.poly.desc, &c, s.a, s.poly.a, s.a,
                                                s.poly.b, &b, s.a, s.poly.c, s.b, s.poly.c,
                                                &s.poly.algo, s.workspace, kWorkspaceBytes, stream));
    // Z' = B Z + a Z (in X's row-major layout: Xc B + a Xc when wide, B Xc + a Xc when tall)
    const bool wide = s.m <= s.n;
    const void* lhs = wide ? static_cast<const void*>(zin) : static_cast<const void*>(s.b);
    const void* rhs = wide ? static_cast<const void*>(s.b) : static_cast<const void*>(zin);
    MDOPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(s.handle, s.update.desc, &one, lhs, s.update.a,
                                                rhs, s.update.b, &a, zin, s.update.c, zout,
                                                s.update.c, &s.update.algo, s.workspace,
                                                kWorkspaceBytes, stream));
  }
  return {};
}

}  // namespace mdopt::kernels::cuda
