// Where the bf16 mode rounds. Every GEMM takes bf16 operands, accumulates in float32 and
// rounds its output once (alpha acc + beta C in float32, then to bf16) where that output is
// stored, so a stored matrix is always one rounding of an exact expression:
//   Z_0 = bf16(X * s)                   s = float(1 / (||X||_F + 1e-7))
//   standard:  A = bf16(Z Z^T), B = bf16(c A A + b A), Z' = bf16(a Z + B Z): the iterate
//              lives in bf16 between iterations (as in torch's bf16 Newton-Schulz); O is
//              the last Z widened to float32.
//   Gram:      the rounding points of kernels/cpu/newton_schulz_bf16_gram.cc, which argues
//              them: A_0 = bf16(Z_0 Z_0^T); P = bf16(a I + b A + c A A) rounded whole (the
//              GEMM gives c A A + b A, and a diagonal pass recomputes each P_ii =
//              a + b A_ii + c sum_j A_ij^2 from A before its one rounding, so that a enters
//              before it); bf16(P A); A' = bf16((P A) P); Q' = bf16(P Q); O = Q Z_0 in float32
//              straight into the caller's matrices.
// The Gram form's iterates A and Q are symmetric in exact arithmetic but not after bf16
// products; the CPU's bf16 path averages M and M^T in float32 before rounding, which needs a
// float32 s x s output and a pass over it per product. Here the bf16 product's upper
// triangle is copied onto its lower one (a pass over half of a bf16 matrix), as the CPU's
// float32 path mirrors its upper tiles: the iterates stay exactly symmetric, and the
// diagonal pass can read rows only.
// The float32 mode computes the same sequence with nothing rounded to bf16.
//
// Workspace, in this order, each part 256-byte aligned (e = 2 bytes for bf16, 4 for f32;
// nb = min(batch, MaxBatchPerCall())): cuBLASLt's 32 MiB; nb x chunks float64 norm partials;
// nb float32 scales; m x n iterates, two in the standard form and one (Z_0) in the Gram form;
// s x s matrices, two (A, B) in the standard form and four (A, P, Q, and the scratch T) in the
// Gram form. Rows are padded to 8 elements and every matrix to 256 bytes, so that every
// matrix of a batch starts 256-byte aligned whatever the shape.
#include "kernels/cuda/newton_schulz.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "kernels/common/bf16.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/cuda/cublaslt_api.h"
#include "kernels/cuda/cuda_check.h"

namespace mdopt::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kNormElemsPerThread = 8;
// Norm partials per matrix: 132 SMs x 8 resident blocks of 256 threads fill an H100 with
// about 1,056 blocks, so a single large matrix is summed by up to 1,024.
constexpr int kMaxNormChunks = 1024;
constexpr int64_t kLtWorkspaceBytes = int64_t{32} << 20;  // as cuBLAS itself uses on Hopper
constexpr int64_t kAlign = 256;                           // cuBLASLt's default alignment
constexpr int64_t kLdMultiple = 8;                        // row padding, elements
constexpr int kTile = 32;                                 // the mirror pass's tiles
constexpr unsigned kMaxElementwiseBlocks = 4096;          // row blocks per matrix

std::atomic<int64_t> g_max_batch{NewtonSchulzRunner::kMaxBatchPerCall};

int64_t RoundUp(int64_t v, int64_t k) { return (v + k - 1) / k * k; }

// cuBLASLt's functions (opened at first use: kernels/cuda/cublaslt_api.h). Valid once a
// NewtonSchulzRunner exists: Create loads the table or fails, and every other call here
// comes from a runner.
const CublasLtApi& Lt() { return *LoadCublasLt(nullptr); }

// ---- kernels -------------------------------------------------------------------------

__device__ __forceinline__ float Load(uint16_t v) { return Bf16ToFloat(v); }
__device__ __forceinline__ float Load(float v) { return v; }
__device__ __forceinline__ void Store(uint16_t* p, float v) { *p = FloatToBf16(v); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }

// The sum of one value per thread of the block, in a fixed tree; valid in thread 0.
__device__ double BlockSum(double v) {
  __shared__ double red[kThreads];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// Block (c, b) sums the squares of chunk c of matrix b in float64: thread t takes elements
// t, t + 256, ... of the chunk in order, then the fixed tree.
__global__ void SumSquaresKernel(const float* __restrict x, int64_t stride, int64_t per,
                                 int chunks, double* __restrict partial) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t begin = per * c / chunks, end = per * (c + 1) / chunks;
  const float* xb = x + b * stride;
  double acc = 0.0;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const double v = xb[e];
    acc += v * v;
  }
  const double total = BlockSum(acc);
  if (threadIdx.x == 0) partial[b * chunks + c] = total;
}

// scale_b = 1 / (||X_b||_F + eps) from matrix b's partials, summed in a fixed order.
__global__ void NormScaleKernel(const double* __restrict partial, int chunks,
                                float* __restrict scale) {
  const int64_t b = blockIdx.x;
  double acc = 0.0;
  for (int c = threadIdx.x; c < chunks; c += kThreads) acc += partial[b * chunks + c];
  const double total = BlockSum(acc);
  if (threadIdx.x == 0) scale[b] = static_cast<float>(1.0 / (sqrt(total) + kNsNormEps));
}

// Z_0 = X * scale into the padded iterate (bf16: rounded once). Blocks take rows, threads
// columns (no division per element).
template <typename T>
__global__ void NormaliseKernel(const float* __restrict x, int64_t stride, int64_t m, int64_t n,
                                const float* __restrict scale, T* __restrict z, int64_t ld,
                                int64_t zstride) {
  const int64_t b = blockIdx.y;
  const float s = scale[b];
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const float* xr = x + b * stride + i * n;
    T* zr = z + b * zstride + i * ld;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) Store(zr + j, xr[j] * s);
  }
}

// The standard form's O: the last iterate back into the caller's matrices as float32.
template <typename T>
__global__ void StoreKernel(const T* __restrict z, int64_t ld, int64_t zstride, int64_t m,
                            int64_t n, float* __restrict x, int64_t stride) {
  const int64_t b = blockIdx.y;
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const T* zr = z + b * zstride + i * ld;
    float* xr = x + b * stride + i * n;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) xr[j] = Load(zr[j]);
  }
}

// Copies the upper triangle of each s x s matrix onto its lower one. Block (bi * tiles + bj,
// b) with bi <= bj reads the tile at tile-row bi, tile-column bj and writes its transpose's
// strictly lower elements; blocks below the diagonal have nothing to do.
template <typename T>
__global__ void MirrorUpperKernel(T* __restrict a, int64_t s, int64_t ld, int64_t stride,
                                  int tiles) {
  const int bi = blockIdx.x / tiles, bj = blockIdx.x % tiles;
  if (bi > bj) return;
  T* mat = a + blockIdx.y * stride;
  __shared__ T tile[kTile][kTile + 1];
  for (int r = threadIdx.y; r < kTile; r += blockDim.y) {
    const int64_t i = static_cast<int64_t>(bi) * kTile + r, j = static_cast<int64_t>(bj) * kTile + threadIdx.x;
    if (i < s && j < s) tile[r][threadIdx.x] = mat[i * ld + j];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += blockDim.y) {
    const int64_t i = static_cast<int64_t>(bj) * kTile + r, j = static_cast<int64_t>(bi) * kTile + threadIdx.x;
    if (i < s && j < s && i > j) mat[i * ld + j] = tile[threadIdx.x][r];
  }
}

// P_ii = a + b A_ii + c sum_j A_ij^2 (A symmetric: row i of A A's diagonal), replacing the
// GEMM's c (A A)_ii + b A_ii so that a is added before the one rounding. One warp per row:
// lane l sums j = l, l + 32, ... in order, then a fixed butterfly.
template <typename T>
__global__ void PolyDiagKernel(const T* __restrict a, T* __restrict p, int64_t s, int64_t ld,
                               int64_t stride, float ca, float cb, float cc) {
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (i >= s) return;  // the whole warp
  const T* row = a + blockIdx.y * stride + i * ld;
  float acc = 0.0f;
  for (int64_t j = lane; j < s; j += 32) {
    const float v = Load(row[j]);
    acc = fmaf(v, v, acc);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) Store(p + blockIdx.y * stride + i * ld + i, ca + cb * Load(row[i]) + cc * acc);
}

// ---- layout of one call's workspace ----------------------------------------------------

struct Layout {
  int64_t nb = 0, m = 0, n = 0, s = 0;
  bool tall = false, gram = false, bf16 = true;
  int64_t esize = 2;
  int64_t ldz = 0, zstride = 0;  // m x n iterates, row-major, elements
  int64_t lds = 0, sstride = 0;  // s x s matrices
  int chunks = 1;
  // Byte offsets.
  int64_t lt = 0, partial = 0, scale = 0;
  int64_t z[2] = {0, 0};
  int64_t sq[4] = {0, 0, 0, 0};
  int64_t total = 0;
};

int NormChunks(int64_t per) {
  return static_cast<int>(std::clamp<int64_t>(
      (per + kThreads * kNormElemsPerThread - 1) / (kThreads * kNormElemsPerThread), 1,
      kMaxNormChunks));
}

Layout MakeLayout(int64_t nb, int64_t m, int64_t n, bool gram, bool bf16) {
  Layout L;
  L.nb = nb;
  L.m = m;
  L.n = n;
  L.s = std::min(m, n);
  L.tall = m > n;
  L.gram = gram;
  L.bf16 = bf16;
  L.esize = bf16 ? 2 : 4;
  L.ldz = RoundUp(n, kLdMultiple);
  L.zstride = RoundUp(m * L.ldz * L.esize, kAlign) / L.esize;
  L.lds = RoundUp(L.s, kLdMultiple);
  L.sstride = RoundUp(L.s * L.lds * L.esize, kAlign) / L.esize;
  L.chunks = NormChunks(m * n);
  int64_t at = 0;
  const auto take = [&at](int64_t bytes) {
    const int64_t here = at;
    at += RoundUp(bytes, kAlign);
    return here;
  };
  L.lt = take(kLtWorkspaceBytes);
  L.partial = take(nb * L.chunks * static_cast<int64_t>(sizeof(double)));
  L.scale = take(nb * static_cast<int64_t>(sizeof(float)));
  const int64_t zbytes = nb * L.zstride * L.esize, sbytes = nb * L.sstride * L.esize;
  L.z[0] = take(zbytes);
  L.z[1] = gram ? L.z[0] : take(zbytes);
  const int squares = gram ? 4 : 2;
  for (int k = 0; k < 4; ++k) L.sq[k] = k < squares ? take(sbytes) : L.sq[0];
  L.total = at;
  return L;
}

// The alignment in bytes (up to 256) of every matrix of a batch that starts at `addr` with
// matrices `stride_bytes` apart.
uint32_t BatchAlignment(uint64_t addr, int64_t nb, int64_t stride_bytes) {
  const uint64_t v = addr | (nb > 1 ? static_cast<uint64_t>(stride_bytes) : 0);
  const uint64_t low = v & (~v + 1);
  return static_cast<uint32_t>(v == 0 ? kAlign : std::min<uint64_t>(low, kAlign));
}

// ---- GEMMs -------------------------------------------------------------------------------

// A row-major matrix as stored: rows x cols, leading dimension and batch stride in elements.
struct Operand {
  int64_t rows, cols, ld, stride;
  cudaDataType_t type;
  uint32_t align;  // bytes, of every matrix of the batch
};

// D = alpha op(L) op(R) + beta C in row-major terms, on a batch, its algorithm chosen once.
// Row-major M is column-major M^T, so cuBLASLt computes D^T = op(R)^T op(L)^T: its A is R,
// its B is L, and the op flags stay those of the row-major product. C and D share a layout.
struct Gemm {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, cd = nullptr;
  cublasLtMatmulAlgo_t algo{};

  Gemm() = default;
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  ~Gemm() {
    if (a) Lt().MatrixLayoutDestroy(a);
    if (b) Lt().MatrixLayoutDestroy(b);
    if (cd) Lt().MatrixLayoutDestroy(cd);
    if (desc) Lt().MatmulDescDestroy(desc);
  }
};

// The column-major view of a stored row-major operand.
DeviceStatus ColumnMajor(const Operand& o, int64_t nb, cublasLtMatrixLayout_t* out) {
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().MatrixLayoutCreate(
      out, o.type, static_cast<uint64_t>(o.cols), static_cast<uint64_t>(o.rows), o.ld));
  const int32_t count = static_cast<int32_t>(nb);
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().MatrixLayoutSetAttribute(
      *out, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().MatrixLayoutSetAttribute(
      *out, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &o.stride, sizeof o.stride));
  return {};
}

DeviceStatus MakeGemm(cublasLtHandle_t h, int64_t nb, const Operand& l, bool tl, const Operand& r,
                      bool tr, const Operand& out, Gemm* g) {
  // float32 accumulation; with float32 operands this is plain FP32 (no TF32: that would be
  // CUBLAS_COMPUTE_32F_FAST_TF32).
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().MatmulDescCreate(&g->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t opa = tr ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = tl ? CUBLAS_OP_T : CUBLAS_OP_N;
  MDOPT_CUBLAS_RETURN_IF_ERROR(
      Lt().MatmulDescSetAttribute(g->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
  MDOPT_CUBLAS_RETURN_IF_ERROR(
      Lt().MatmulDescSetAttribute(g->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
  if (DeviceStatus s = ColumnMajor(r, nb, &g->a); !s.ok()) return s;
  if (DeviceStatus s = ColumnMajor(l, nb, &g->b); !s.ok()) return s;
  if (DeviceStatus s = ColumnMajor(out, nb, &g->cd); !s.ok()) return s;
  cublasLtMatmulPreference_t pref = nullptr;
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().MatmulPreferenceCreate(&pref));
  const uint64_t ws = kLtWorkspaceBytes;
  cublasStatus_t st = Lt().MatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  // The true alignment of every operand (cuBLASLt assumes 256 bytes unless told), so that
  // the heuristic offers only algorithms that work at it.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, r.align},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, l.align},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, out.align},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, out.align}};
  for (const auto& [attr, value] : aligns)
    if (st == CUBLAS_STATUS_SUCCESS)
      st = Lt().MatmulPreferenceSetAttribute(pref, attr, &value, sizeof value);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = Lt().MatmulAlgoGetHeuristic(h, g->desc, g->a, g->b, g->cd, g->cd, pref, 1, &result,
                                        &found);
  Lt().MatmulPreferenceDestroy(pref);
  MDOPT_CUBLAS_RETURN_IF_ERROR(st);
  if (found < 1)
    return DeviceStatus::Error("cuBLASLt has no " + std::string(l.type == CUDA_R_16BF ? "bf16" : "f32") +
                               " GEMM algorithm for " + std::to_string(out.rows) + " x " +
                               std::to_string(out.cols) + " (batch " + std::to_string(nb) + ")");
  g->algo = result.algo;
  return {};
}

DeviceStatus Matmul(cublasLtHandle_t h, const Gemm& g, float alpha, const void* l, const void* r,
                    float beta, const void* c, void* d, void* lt_workspace, cudaStream_t stream) {
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().Matmul(h, g.desc, &alpha, r, g.a, l, g.b, &beta, c, g.cd, d,
                                              g.cd, &g.algo, lt_workspace, kLtWorkspaceBytes,
                                              stream));
  return {};
}

// Everything of one (nb, m, n, form, dtype): the workspace layout and its GEMMs.
struct Plan {
  Layout lay;
  Gemm gram;    // A = Z Z^T (tall: Z^T Z), both forms
  Gemm square;  // s x s: c A A + b A, and the Gram form's plain products
  Gemm update;  // standard form: Z' = B Z + a Z (tall: Z B + a Z)
  // Gram form: O = Q Z_0 (tall: Z_0 Q) into the caller's matrices, by (stride, alignment).
  std::map<std::pair<int64_t, uint32_t>, std::unique_ptr<Gemm>> out;

  Operand Iterate() const {
    return {lay.m, lay.n, lay.ldz, lay.zstride, lay.bf16 ? CUDA_R_16BF : CUDA_R_32F,
            static_cast<uint32_t>(kAlign)};
  }
  Operand Square() const {
    return {lay.s, lay.s, lay.lds, lay.sstride, lay.bf16 ? CUDA_R_16BF : CUDA_R_32F,
            static_cast<uint32_t>(kAlign)};
  }
};

using PlanKey = std::tuple<int64_t, int64_t, int64_t, bool, bool>;  // nb, m, n, gram, bf16

DeviceStatus CheckShape(int64_t batch, int64_t m, int64_t n) {
  if (batch < 1 || m < 1 || n < 1)
    return DeviceStatus::Error("Newton-Schulz needs batch, m and n >= 1 (got batch " +
                               std::to_string(batch) + ", " + std::to_string(m) + " x " +
                               std::to_string(n) + ")");
  return {};
}

template <typename T>
T* At(void* base, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

// Row blocks of the normalising and storing passes: a few rows each beyond 4,096 rows.
unsigned RowBlocks(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, kMaxElementwiseBlocks));
}

}  // namespace

struct NewtonSchulzRunner::Impl {
  cublasLtHandle_t handle = nullptr;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;

  ~Impl() {
    plans.clear();  // descriptors before the handle
    if (handle) Lt().Destroy(handle);
  }

  DeviceStatus GetPlan(int64_t nb, int64_t m, int64_t n, bool gram, bool bf16, Plan** out) {
    const PlanKey key{nb, m, n, gram, bf16};
    if (auto it = plans.find(key); it != plans.end()) {
      *out = it->second.get();
      return {};
    }
    auto p = std::make_unique<Plan>();
    p->lay = MakeLayout(nb, m, n, gram, bf16);
    const Operand z = p->Iterate(), sq = p->Square();
    const bool tall = p->lay.tall;
    // A = Z Z^T (wide) or Z^T Z (tall).
    if (DeviceStatus s = MakeGemm(handle, nb, z, tall, z, !tall, sq, &p->gram); !s.ok()) return s;
    if (DeviceStatus s = MakeGemm(handle, nb, sq, false, sq, false, sq, &p->square); !s.ok())
      return s;
    if (!gram) {
      DeviceStatus s = tall ? MakeGemm(handle, nb, z, false, sq, false, z, &p->update)
                            : MakeGemm(handle, nb, sq, false, z, false, z, &p->update);
      if (!s.ok()) return s;
    }
    *out = p.get();
    plans.emplace(key, std::move(p));
    return {};
  }

  DeviceStatus GetOut(Plan& p, int64_t stride, uint32_t align, Gemm** out) {
    const auto key = std::make_pair(stride, align);
    if (auto it = p.out.find(key); it != p.out.end()) {
      *out = it->second.get();
      return {};
    }
    const Layout& L = p.lay;
    const Operand x{L.m, L.n, L.n, stride, CUDA_R_32F, align};
    auto g = std::make_unique<Gemm>();
    const Operand z = p.Iterate(), sq = p.Square();
    DeviceStatus s = L.tall ? MakeGemm(handle, L.nb, z, false, sq, false, x, g.get())
                            : MakeGemm(handle, L.nb, sq, false, z, false, x, g.get());
    if (!s.ok()) return s;
    *out = g.get();
    p.out.emplace(key, std::move(g));
    return {};
  }

  template <typename T>
  DeviceStatus RunChunk(Plan& p, NsCoeffSet set, int steps, float* x, int64_t stride,
                        void* ws, cudaStream_t stream);
};

template <typename T>
DeviceStatus NewtonSchulzRunner::Impl::RunChunk(Plan& p, NsCoeffSet set, int steps, float* x,
                                                int64_t stride, void* ws, cudaStream_t stream) {
  const Layout& L = p.lay;
  const unsigned nb = static_cast<unsigned>(L.nb);
  void* lt = At<char>(ws, L.lt);
  double* partial = At<double>(ws, L.partial);
  float* scale = At<float>(ws, L.scale);
  T* z[2] = {At<T>(ws, L.z[0]), At<T>(ws, L.z[1])};
  T* sq[4] = {At<T>(ws, L.sq[0]), At<T>(ws, L.sq[1]), At<T>(ws, L.sq[2]), At<T>(ws, L.sq[3])};
  const int64_t per = L.m * L.n;

  SumSquaresKernel<<<dim3(static_cast<unsigned>(L.chunks), nb), kThreads, 0, stream>>>(
      x, stride, per, L.chunks, partial);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  NormScaleKernel<<<nb, kThreads, 0, stream>>>(partial, L.chunks, scale);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const dim3 elementwise(RowBlocks(L.m), nb);
  NormaliseKernel<T><<<elementwise, kThreads, 0, stream>>>(x, stride, L.m, L.n, scale, z[0], L.ldz,
                                                           L.zstride);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  if (!L.gram) {
    int cur = 0;
    for (int k = 0; k < steps; ++k) {
      const NsTuple t = NsCoefficients(set, k);
      const float ca = static_cast<float>(t.a), cb = static_cast<float>(t.b),
                  cc = static_cast<float>(t.c);
      T* a = sq[0];
      T* b = sq[1];
      // A = Z Z^T; B = c A A + b A; Z' = B Z + a Z (tall: Z B + a Z).
      if (DeviceStatus s = Matmul(handle, p.gram, 1.0f, z[cur], z[cur], 0.0f, a, a, lt, stream); !s.ok())
        return s;
      if (DeviceStatus s = Matmul(handle, p.square, cc, a, a, cb, a, b, lt, stream); !s.ok()) return s;
      const void* lhs = L.tall ? static_cast<const void*>(z[cur]) : static_cast<const void*>(b);
      const void* rhs = L.tall ? static_cast<const void*>(b) : static_cast<const void*>(z[cur]);
      if (DeviceStatus s = Matmul(handle, p.update, 1.0f, lhs, rhs, ca, z[cur], z[1 - cur], lt, stream);
          !s.ok())
        return s;
      cur = 1 - cur;
    }
    StoreKernel<T><<<elementwise, kThreads, 0, stream>>>(z[cur], L.ldz, L.zstride, L.m, L.n, x,
                                                         stride);
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return {};
  }

  // The Gram form (kernels/cpu/newton_schulz.cc has the derivation).
  const int tiles = static_cast<int>((L.s + kTile - 1) / kTile);
  const dim3 mirror_grid(static_cast<unsigned>(tiles) * static_cast<unsigned>(tiles), nb);
  const dim3 mirror_block(kTile, 8);
  const dim3 diag_grid(static_cast<unsigned>((L.s + kThreads / 32 - 1) / (kThreads / 32)), nb);
  const auto mirror = [&](T* m) -> DeviceStatus {
    MirrorUpperKernel<T><<<mirror_grid, mirror_block, 0, stream>>>(m, L.s, L.lds, L.sstride, tiles);
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return {};
  };
  T* a = sq[0];
  T* pk = sq[1];
  T* q = sq[2];
  T* t = sq[3];
  if (DeviceStatus s = Matmul(handle, p.gram, 1.0f, z[0], z[0], 0.0f, a, a, lt, stream); !s.ok()) return s;
  if (DeviceStatus s = mirror(a); !s.ok()) return s;
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    const float ca = static_cast<float>(c.a), cb = static_cast<float>(c.b),
                cc = static_cast<float>(c.c);
    // P = a I + b A + c A A: the GEMM's c A A + b A, then the diagonal recomputed with a.
    if (DeviceStatus s = Matmul(handle, p.square, cc, a, a, cb, a, pk, lt, stream); !s.ok()) return s;
    PolyDiagKernel<T><<<diag_grid, kThreads, 0, stream>>>(a, pk, L.s, L.lds, L.sstride, ca, cb, cc);
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    if (k + 1 < steps) {  // A_{k+1} = (P A) P
      if (DeviceStatus s = Matmul(handle, p.square, 1.0f, pk, a, 0.0f, t, t, lt, stream); !s.ok()) return s;
      if (DeviceStatus s = Matmul(handle, p.square, 1.0f, t, pk, 0.0f, a, a, lt, stream); !s.ok()) return s;
      if (DeviceStatus s = mirror(a); !s.ok()) return s;
    }
    if (k == 0) {
      std::swap(q, pk);  // Q_1 = P_0; P's old buffer is free for P_1
    } else {             // Q_{k+1} = P Q
      if (DeviceStatus s = Matmul(handle, p.square, 1.0f, pk, q, 0.0f, t, t, lt, stream); !s.ok()) return s;
      if (DeviceStatus s = mirror(t); !s.ok()) return s;
      std::swap(q, t);
    }
  }
  // O = Q Z_0 (tall: Z_0 Q), float32, straight into x.
  Gemm* out = nullptr;
  const uint32_t align = BatchAlignment(reinterpret_cast<uint64_t>(x), L.nb,
                                        stride * static_cast<int64_t>(sizeof(float)));
  if (DeviceStatus s = GetOut(p, stride, align, &out); !s.ok()) return s;
  const void* lhs = L.tall ? static_cast<const void*>(z[0]) : static_cast<const void*>(q);
  const void* rhs = L.tall ? static_cast<const void*>(q) : static_cast<const void*>(z[0]);
  return Matmul(handle, *out, 1.0f, lhs, rhs, 0.0f, x, x, lt, stream);
}

NewtonSchulzRunner::NewtonSchulzRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
NewtonSchulzRunner::~NewtonSchulzRunner() = default;

DeviceStatus NewtonSchulzRunner::Create(std::unique_ptr<NewtonSchulzRunner>* out) {
  std::string error;
  if (LoadCublasLt(&error) == nullptr) return DeviceStatus::Error(error);
  auto impl = std::make_unique<Impl>();
  MDOPT_CUBLAS_RETURN_IF_ERROR(Lt().Create(&impl->handle));
  out->reset(new NewtonSchulzRunner(std::move(impl)));
  return {};
}

// The rule of kernels/cpu/newton_schulz.h ResolveNsForm (kernels/cuda does not link the CPU
// backend): below aspect 2 the Gram form's s^3 terms cost more than it saves.
NsForm NewtonSchulzRunner::Resolve(NsForm form, int64_t m, int64_t n) {
  if (form != NsForm::kAuto) return form;
  return std::max(m, n) >= 2 * std::min(m, n) ? NsForm::kGram : NsForm::kStandard;
}

int64_t NewtonSchulzRunner::MaxBatchPerCall() { return g_max_batch.load(); }

void NewtonSchulzRunner::SetMaxBatchPerCallForTesting(int64_t max_batch) {
  g_max_batch.store(max_batch <= 0 ? kMaxBatchPerCall : std::min(max_batch, kMaxBatchPerCall));
}

int64_t NewtonSchulzRunner::WorkspaceBytes(int64_t batch, int64_t m, int64_t n, NsForm form,
                                           bool bf16) {
  if (!CheckShape(batch, m, n).ok()) return 0;
  return MakeLayout(std::min(batch, MaxBatchPerCall()), m, n,
                    Resolve(form, m, n) == NsForm::kGram, bf16)
      .total;
}

double NewtonSchulzRunner::Flops(int steps, int64_t batch, int64_t m, int64_t n, NsForm form) {
  const double s = static_cast<double>(std::min(m, n)), l = static_cast<double>(std::max(m, n));
  const double k = steps, b = static_cast<double>(batch);
  if (Resolve(form, m, n) == NsForm::kGram) return b * (4.0 * s * s * l + (8.0 * k - 6.0) * s * s * s);
  return b * k * (4.0 * s * s * l + 2.0 * s * s * s);
}

int64_t NewtonSchulzRunner::Launches(int steps, int64_t batch, int64_t m, int64_t n, NsForm form,
                                     bool /*bf16*/) {
  const int64_t calls = (batch + MaxBatchPerCall() - 1) / MaxBatchPerCall();
  const int64_t k = steps;
  const int64_t per = Resolve(form, m, n) == NsForm::kGram ? 3 + 2 + 2 * k + 5 * (k - 1) + 1
                                                           : 3 + 3 * k + 1;
  return calls * per;
}

DeviceStatus NewtonSchulzRunner::Prepare(int64_t batch, int64_t m, int64_t n, NsForm form,
                                         bool bf16) {
  if (DeviceStatus s = CheckShape(batch, m, n); !s.ok()) return s;
  const bool gram = Resolve(form, m, n) == NsForm::kGram;
  const int64_t max = MaxBatchPerCall();
  const int64_t full = std::min(batch, max), rest = batch > max ? batch % max : 0;
  for (const int64_t nb : {full, rest}) {
    if (nb == 0) continue;
    Plan* p = nullptr;
    if (DeviceStatus s = impl_->GetPlan(nb, m, n, gram, bf16, &p); !s.ok()) return s;
    if (gram) {
      // The last call starts (batch / max) * max matrices after a 256-byte aligned x.
      const int64_t first = nb == full ? 0 : (batch / max) * max;
      const int64_t bytes = m * n * static_cast<int64_t>(sizeof(float));
      Gemm* g = nullptr;
      if (DeviceStatus s = impl_->GetOut(*p, m * n, BatchAlignment(static_cast<uint64_t>(first * bytes), nb, bytes), &g);
          !s.ok())
        return s;
    }
  }
  return {};
}

DeviceStatus NewtonSchulzRunner::Run(NsCoeffSet set, int steps, int64_t batch, int64_t m,
                                     int64_t n, float* x, int64_t stride, NsForm form, bool bf16,
                                     void* workspace, int64_t workspace_bytes, void* stream) {
  if (DeviceStatus s = CheckShape(batch, m, n); !s.ok()) return s;
  if (steps < 1) return DeviceStatus::Error("Newton-Schulz needs steps >= 1");
  if (x == nullptr || workspace == nullptr)
    return DeviceStatus::Error("Newton-Schulz needs its matrices and a workspace");
  if (stride < m * n)
    return DeviceStatus::Error("Newton-Schulz stride " + std::to_string(stride) + " < m * n = " +
                               std::to_string(m * n));
  if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0)
    return DeviceStatus::Error("Newton-Schulz workspace is not 256-byte aligned");
  const int64_t need = WorkspaceBytes(batch, m, n, form, bf16);
  if (workspace_bytes < need)
    return DeviceStatus::Error("Newton-Schulz workspace of " + std::to_string(workspace_bytes) +
                               " bytes, needs " + std::to_string(need));
  const bool gram = Resolve(form, m, n) == NsForm::kGram;
  const int64_t max = MaxBatchPerCall();
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int64_t first = 0; first < batch; first += max) {
    const int64_t nb = std::min(max, batch - first);
    Plan* p = nullptr;
    if (DeviceStatus s = impl_->GetPlan(nb, m, n, gram, bf16, &p); !s.ok()) return s;
    float* xc = x + first * stride;
    DeviceStatus s = bf16 ? impl_->RunChunk<uint16_t>(*p, set, steps, xc, stride, workspace, st)
                          : impl_->RunChunk<float>(*p, set, steps, xc, stride, workspace, st);
    if (!s.ok()) return s;
  }
  return {};
}

}  // namespace mdopt::kernels::cuda
