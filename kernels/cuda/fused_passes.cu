#include "kernels/cuda/fused_passes.h"

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/md_elementwise.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/newton_schulz.h"

namespace mdopt::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Rows per block of the elementwise passes: each thread walks a column down the tile, so
// column partial sums stay in a register and the tile's row sums in a small array.
constexpr int kTileRows = 16;

// Everything one matrix's passes touch, on the device (the tensor-list entry).
struct DeviceMatrix {
  int64_t m, n, tiles;
  float* w;
  float* s0;
  float* s1;
  const void* grad;
  void* model;
  int grad_bf16, model_bf16;
  float *row_raw, *row_m, *row_v, *col_raw, *col_m, *col_v, *sc_raw, *sc_m, *sc_v;
  const float* radius;
  // Workspace, planned at Create.
  float* row_gain;   // m: effective row gains
  float* col_gain;   // n
  float* inv_col;    // n: 1 / col_gain
  double* scalars;   // [0] scalar gain value, [1] scalar-gain gradient, [2] ||D'||_F^2
  double* row_grad;  // m: d loss / d gamma_row
  double* col_grad;  // n: d loss / d gamma_col
  double* slice_sq;  // row sphere: m; col sphere: n
  double* tile_a;    // tiles x n: column-gain gradient partials
  double* tile_b;    // tiles x n: column-sphere squared-norm partials
  double* tile_s;    // tiles x 2: scalar-gain gradient and frobenius partials
  float* x;          // muon: the Newton-Schulz input rows (inside its batch)
  const uint16_t* o; // muon: NS(X), bf16 (inside its batch)
  float muon_scale;  // MuonScaleFactor(rule, m, n)
};

struct Task {
  int32_t matrix, tile;
};

__device__ inline float Load(const void* p, int bf16, int64_t i) {
  return bf16 ? Bf16ToFloat(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

__device__ inline void StoreModel(const DeviceMatrix& M, int64_t i, float v) {
  if (M.model == nullptr) return;
  if (M.model_bf16) {
    static_cast<uint16_t*>(M.model)[i] = FloatToBf16(v);
  } else {
    static_cast<float*>(M.model)[i] = v;
  }
}

// The block's sum of one value per thread, a fixed tree (same order every launch); every
// thread gets it. `red` is kThreads doubles of shared memory.
__device__ inline double BlockSum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();
  return total;
}

// Effective gains of every matrix at the current raw values: grid.y = matrix.
__global__ void GainValuesKernel(const DeviceMatrix* __restrict mats, UpdateRule r) {
  const DeviceMatrix& M = mats[blockIdx.y];
  const int64_t k = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (k < M.m) M.row_gain[k] = HasRowGains(r.gains) ? md::EffectiveGain(r.gain_param, M.row_raw[k]) : 1.0f;
  if (k < M.n) {
    const float c = HasColGains(r.gains) ? md::EffectiveGain(r.gain_param, M.col_raw[k]) : 1.0f;
    M.col_gain[k] = c;
    M.inv_col[k] = 1.0f / c;
  }
  if (k == 0)
    M.scalars[0] = HasScalarGain(r.gains) ? GainValue<double>(r.gain_param, M.sc_raw[0]) : 1.0;
}

// Squared norms of D' rows into the sphere's partials (after the tile's column loop).
__device__ inline void SliceSums(const UpdateRule& r, const DeviceMatrix& M, const Task& t,
                                 int rows, const double* sq, double* red) {
  if (r.sphere == Sphere::kRow) {
    for (int q = 0; q < rows; ++q) {
      const double s = BlockSum(sq[q], red);
      if (threadIdx.x == 0) M.slice_sq[t.tile * kTileRows + q] = s;
    }
  } else if (r.sphere == Sphere::kFrobenius) {
    double f = 0.0;
    for (int q = 0; q < rows; ++q) f += sq[q];
    const double s = BlockSum(f, red);
    if (threadIdx.x == 0) M.tile_s[2 * t.tile + 1] = s;
  }
}

// Pass 1: D, gain-gradient partials, G_D, then muon's momentum and X, or Adam's moments
// and D' (with its squared-norm partials).
__global__ void __launch_bounds__(kThreads) Pass1Kernel(const DeviceMatrix* __restrict mats,
                                                        const Task* __restrict tasks, UpdateRule r,
                                                        md::AdamScalars a, float mu) {
  __shared__ double red[kThreads];
  const Task t = tasks[blockIdx.x];
  const DeviceMatrix M = mats[t.matrix];
  const int64_t n = M.n, i0 = static_cast<int64_t>(t.tile) * kTileRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), M.m - i0));
  const bool muon = r.base == Base::kMuon;
  const bool direct = r.sphere == Sphere::kNone && r.gains == Gains::kNone;
  const bool gain_grads = r.gains != Gains::kNone, want_col = HasColGains(r.gains);
  const double scalar = M.scalars[0];
  float inv_row[kTileRows], row_scale[kTileRows];
  double row_acc[kTileRows], sq[kTileRows];
  double scalar_acc = 0.0;
#pragma unroll
  for (int q = 0; q < kTileRows; ++q) {
    const double rs = q < rows ? scalar * M.row_gain[i0 + q] : 1.0;
    inv_row[q] = md::InverseRowScale(rs);
    row_scale[q] = static_cast<float>(rs);
    row_acc[q] = 0.0;
    sq[q] = 0.0;
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float ic = M.inv_col[j], c = M.col_gain[j];
    double col_a = 0.0, col_b = 0.0;
#pragma unroll
    for (int q = 0; q < kTileRows; ++q) {
      if (q < rows) {
        const int64_t e = (i0 + q) * n + j;
        const float g = Load(M.grad, M.grad_bf16, e);
        const float w = M.w[e];
        if (gain_grads) {
          const float dg = md::GainGradTerm(w, inv_row[q], ic, g);
          row_acc[q] += static_cast<double>(dg * c);
          scalar_acc += static_cast<double>(dg);
          if (want_col) col_a += static_cast<double>(dg * row_scale[q]);
        }
        const float gd = md::DirectionGrad(g, row_scale[q], c);
        if (muon) {
          const float b = md::MuonMomentum(mu, M.s0[e], gd);
          M.s0[e] = b;
          M.x[e] = md::MuonInput(r.nesterov, mu, b, gd);
        } else {
          const float d = md::Direction(w, inv_row[q], ic);
          const float m1 = md::AdamFirstMoment(a, M.s0[e], gd);
          const float m2 = md::AdamSecondMoment(a, M.s1[e], gd);
          M.s0[e] = m1;
          M.s1[e] = m2;
          const float dn = md::AdamApply(a, d, m1, m2);
          M.w[e] = dn;
          if (direct) {
            StoreModel(M, e, dn);
          } else {
            const double s2 = static_cast<double>(dn) * dn;
            sq[q] += s2;
            col_b += s2;
          }
        }
      }
    }
    if (want_col) M.tile_a[t.tile * n + j] = col_a;
    if (!muon && r.sphere == Sphere::kCol) M.tile_b[t.tile * n + j] = col_b;
  }
  if (HasRowGains(r.gains)) {
    for (int q = 0; q < rows; ++q) {
      const double s = BlockSum(row_acc[q], red);
      if (threadIdx.x == 0) M.row_grad[i0 + q] = s * scalar;
    }
  }
  if (HasScalarGain(r.gains)) {
    const double s = BlockSum(scalar_acc, red);
    if (threadIdx.x == 0) M.tile_s[2 * t.tile] = s;
  }
  if (!muon) SliceSums(r, M, t, rows, sq, red);
}

// Pass 2 (muon): D' = D (1 - lr wd) - lr * scale * O, with its squared-norm partials.
__global__ void __launch_bounds__(kThreads) Pass2Kernel(const DeviceMatrix* __restrict mats,
                                                        const Task* __restrict tasks, UpdateRule r,
                                                        float lr, float wdf) {
  __shared__ double red[kThreads];
  const Task t = tasks[blockIdx.x];
  const DeviceMatrix M = mats[t.matrix];
  const int64_t n = M.n, i0 = static_cast<int64_t>(t.tile) * kTileRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), M.m - i0));
  const bool direct = r.sphere == Sphere::kNone && r.gains == Gains::kNone;
  const float step = lr * M.muon_scale;
  const double scalar = M.scalars[0];
  float inv_row[kTileRows];
  double sq[kTileRows];
#pragma unroll
  for (int q = 0; q < kTileRows; ++q) {
    inv_row[q] = md::InverseRowScale(q < rows ? scalar * M.row_gain[i0 + q] : 1.0);
    sq[q] = 0.0;
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float ic = M.inv_col[j];
    double col_b = 0.0;
#pragma unroll
    for (int q = 0; q < kTileRows; ++q) {
      if (q < rows) {
        const int64_t e = (i0 + q) * n + j;
        const float dn = md::MuonApply(md::Direction(M.w[e], inv_row[q], ic), wdf, step,
                                       Bf16ToFloat(M.o[e]));
        M.w[e] = dn;
        if (direct) {
          StoreModel(M, e, dn);
        } else {
          const double s2 = static_cast<double>(dn) * dn;
          sq[q] += s2;
          col_b += s2;
        }
      }
    }
    if (r.sphere == Sphere::kCol) M.tile_b[t.tile * n + j] = col_b;
  }
  SliceSums(r, M, t, rows, sq, red);
}

// The cross-row sums of every matrix, over its tiles in tile order: grid.y = matrix. This is
// where a sharded step all-reduces (col_grad, the col slice sums, scalars[1..2]).
__global__ void ReduceTilesKernel(const DeviceMatrix* __restrict mats, UpdateRule r) {
  const DeviceMatrix& M = mats[blockIdx.y];
  const int64_t j = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (j < M.n) {
    if (HasColGains(r.gains)) {
      double s = 0.0;
      for (int64_t t = 0; t < M.tiles; ++t) s += M.tile_a[t * M.n + j];
      M.col_grad[j] = s;
    }
    if (r.sphere == Sphere::kCol) {
      double s = 0.0;
      for (int64_t t = 0; t < M.tiles; ++t) s += M.tile_b[t * M.n + j];
      M.slice_sq[j] = s;
    }
  }
  if (j == 0) {
    double g = 0.0, f = 0.0;
    for (int64_t t = 0; t < M.tiles; ++t) {
      g += M.tile_s[2 * t];
      f += M.tile_s[2 * t + 1];
    }
    M.scalars[1] = g;
    M.scalars[2] = f;
  }
}

// Adam on every raw gain: grid.y = matrix.
__global__ void GainAdamKernel(const DeviceMatrix* __restrict mats, UpdateRule r,
                               md::GainAdamScalars s) {
  const DeviceMatrix& M = mats[blockIdx.y];
  const int64_t k = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (HasRowGains(r.gains) && k < M.m)
    md::GainAdamElement(r.gain_param, s, M.row_grad[k], M.row_raw + k, M.row_m + k, M.row_v + k);
  if (HasColGains(r.gains) && k < M.n)
    md::GainAdamElement(r.gain_param, s, M.col_grad[k], M.col_raw + k, M.col_m + k, M.col_v + k);
  if (HasScalarGain(r.gains) && k == 0)
    md::GainAdamElement(r.gain_param, s, M.scalars[1], M.sc_raw, M.sc_m, M.sc_v);
}

// Pass 3: W = row_mult (x) D' (x) col_mult with the new gains and the projection, and the
// model copy.
__global__ void __launch_bounds__(kThreads) FinishKernel(const DeviceMatrix* __restrict mats,
                                                         const Task* __restrict tasks, UpdateRule r) {
  const Task t = tasks[blockIdx.x];
  const DeviceMatrix M = mats[t.matrix];
  const int64_t n = M.n, i0 = static_cast<int64_t>(t.tile) * kTileRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), M.m - i0));
  const double frob =
      r.sphere == Sphere::kFrobenius ? md::ProjectionFactor(M.radius[0], M.scalars[2]) : 1.0;
  float row_mult[kTileRows];
#pragma unroll
  for (int q = 0; q < kTileRows; ++q) {
    double rm = 1.0;
    if (q < rows) {
      rm = M.scalars[0] * M.row_gain[i0 + q] * frob;
      if (r.sphere == Sphere::kRow) rm *= md::ProjectionFactor(M.radius[i0 + q], M.slice_sq[i0 + q]);
    }
    row_mult[q] = static_cast<float>(rm);
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    float cm = M.col_gain[j];
    if (r.sphere == Sphere::kCol)
      cm = static_cast<float>(cm * md::ProjectionFactor(M.radius[j], M.slice_sq[j]));
#pragma unroll
    for (int q = 0; q < kTileRows; ++q) {
      if (q < rows) {
        const int64_t e = (i0 + q) * n + j;
        const float v = md::Rescale(M.w[e], row_mult[q], cm);
        M.w[e] = v;
        StoreModel(M, e, v);
      }
    }
  }
}

unsigned Blocks(int64_t count) {
  return static_cast<unsigned>(std::max<int64_t>((count + kThreads - 1) / kThreads, 1));
}

}  // namespace

struct FusedBucket::Impl {
  UpdateRule rule;
  int64_t count = 0, max_len = 0, max_n = 0;
  std::vector<void*> allocations;
  int64_t bytes = 0;
  DeviceMatrix* mats = nullptr;  // device copy of the tensor list
  Task* tasks = nullptr;
  int64_t task_count = 0;
  std::vector<std::unique_ptr<BatchedNewtonSchulz>> ns;  // one per shape (muon)
  bool direct = false;

  ~Impl() {
    for (void* p : allocations) cudaFree(p);
  }

  template <typename T>
  DeviceStatus Alloc(int64_t count_elems, T** p) {
    void* raw = nullptr;
    const size_t size = static_cast<size_t>(std::max<int64_t>(count_elems, 1)) * sizeof(T);
    MDOPT_CUDA_RETURN_IF_ERROR(cudaMalloc(&raw, size));
    allocations.push_back(raw);
    bytes += static_cast<int64_t>(size);
    *p = static_cast<T*>(raw);
    return {};
  }
};

FusedBucket::FusedBucket(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FusedBucket::~FusedBucket() = default;

DeviceStatus FusedBucket::Create(const UpdateRule& rule, const std::vector<MatrixBuffers>& in,
                                 std::unique_ptr<FusedBucket>* out) {
  if (rule.tangent && rule.sphere != Sphere::kNone)
    return DeviceStatus::Error("tangent=1 has no CUDA kernel in this version");
  if (in.empty()) return DeviceStatus::Error("a CUDA bucket needs at least one matrix");
  auto impl = std::make_unique<Impl>();
  Impl& b = *impl;
  b.rule = rule;
  b.count = static_cast<int64_t>(in.size());
  b.direct = rule.sphere == Sphere::kNone && rule.gains == Gains::kNone;
  const bool muon = rule.base == Base::kMuon;
  std::vector<DeviceMatrix> host(in.size());
  std::vector<Task> tasks;
  // Muon: matrices of one shape share one batched Newton-Schulz, in bucket order.
  std::map<std::pair<int64_t, int64_t>, std::vector<size_t>> by_shape;
  for (size_t k = 0; k < in.size(); ++k) {
    const MatrixBuffers& src = in[k];
    if (src.m < 1 || src.n < 1 || src.w == nullptr || src.grad == nullptr || src.state0 == nullptr ||
        (!muon && src.state1 == nullptr))
      return DeviceStatus::Error("matrix " + std::to_string(k) +
                                 " of a CUDA bucket lacks a shape, weights, gradient or state");
    if (rule.sphere != Sphere::kNone && src.radius == nullptr)
      return DeviceStatus::Error("matrix " + std::to_string(k) + " has a sphere but no radius");
    DeviceMatrix& d = host[k];
    d = DeviceMatrix{};
    d.m = src.m;
    d.n = src.n;
    d.tiles = (src.m + kTileRows - 1) / kTileRows;
    if (d.tiles > INT32_MAX) return DeviceStatus::Error("matrix too tall for a CUDA bucket");
    d.w = src.w;
    d.s0 = src.state0;
    d.s1 = src.state1;
    d.grad = src.grad;
    d.grad_bf16 = src.grad_dtype == Dtype::kBf16;
    d.model = src.model;
    d.model_bf16 = src.model_dtype == Dtype::kBf16;
    d.row_raw = src.row_raw;
    d.row_m = src.row_exp_avg;
    d.row_v = src.row_exp_avg_sq;
    d.col_raw = src.col_raw;
    d.col_m = src.col_exp_avg;
    d.col_v = src.col_exp_avg_sq;
    d.sc_raw = src.scalar_raw;
    d.sc_m = src.scalar_exp_avg;
    d.sc_v = src.scalar_exp_avg_sq;
    d.radius = src.radius;
    d.muon_scale = static_cast<float>(MuonScaleFactor(rule.muon_scale, src.m, src.n));
    if ((HasRowGains(rule.gains) && !(d.row_raw && d.row_m && d.row_v)) ||
        (HasColGains(rule.gains) && !(d.col_raw && d.col_m && d.col_v)) ||
        (HasScalarGain(rule.gains) && !(d.sc_raw && d.sc_m && d.sc_v)))
      return DeviceStatus::Error("matrix " + std::to_string(k) + " lacks its gains' buffers");
    DeviceStatus st;
    const int64_t slices = std::max(src.m, src.n);
    if (st = b.Alloc(src.m, &d.row_gain); !st.ok()) return st;
    if (st = b.Alloc(src.n, &d.col_gain); !st.ok()) return st;
    if (st = b.Alloc(src.n, &d.inv_col); !st.ok()) return st;
    if (st = b.Alloc(3, &d.scalars); !st.ok()) return st;
    if (st = b.Alloc(src.m, &d.row_grad); !st.ok()) return st;
    if (st = b.Alloc(src.n, &d.col_grad); !st.ok()) return st;
    if (st = b.Alloc(slices, &d.slice_sq); !st.ok()) return st;
    if (HasColGains(rule.gains))
      if (st = b.Alloc(d.tiles * src.n, &d.tile_a); !st.ok()) return st;
    if (rule.sphere == Sphere::kCol)
      if (st = b.Alloc(d.tiles * src.n, &d.tile_b); !st.ok()) return st;
    if (st = b.Alloc(2 * d.tiles, &d.tile_s); !st.ok()) return st;
    MDOPT_CUDA_RETURN_IF_ERROR(cudaMemset(d.tile_s, 0, sizeof(double) * 2 * d.tiles));
    MDOPT_CUDA_RETURN_IF_ERROR(cudaMemset(d.scalars, 0, sizeof(double) * 3));
    for (int64_t t = 0; t < d.tiles; ++t) tasks.push_back({static_cast<int32_t>(k), static_cast<int32_t>(t)});
    b.max_len = std::max({b.max_len, src.m, src.n});
    b.max_n = std::max(b.max_n, src.n);
    if (muon) by_shape[{src.m, src.n}].push_back(k);
  }
  for (const auto& [shape, members] : by_shape) {
    std::unique_ptr<BatchedNewtonSchulz> ns;
    if (DeviceStatus st = BatchedNewtonSchulz::Create(static_cast<int64_t>(members.size()),
                                                      shape.first, shape.second, rule.ns_coeffs,
                                                      rule.ns_steps, &ns);
        !st.ok())
      return st;
    const int64_t per = shape.first * shape.second;
    for (size_t q = 0; q < members.size(); ++q) {
      host[members[q]].x = ns->input() + static_cast<int64_t>(q) * per;
      host[members[q]].o = ns->output() + static_cast<int64_t>(q) * per;
    }
    b.bytes += ns->device_bytes();
    b.ns.push_back(std::move(ns));
  }
  if (tasks.size() > static_cast<size_t>(INT32_MAX)) return DeviceStatus::Error("too many tiles");
  b.task_count = static_cast<int64_t>(tasks.size());
  if (DeviceStatus st = b.Alloc(b.count, &b.mats); !st.ok()) return st;
  if (DeviceStatus st = b.Alloc(b.task_count, &b.tasks); !st.ok()) return st;
  MDOPT_CUDA_RETURN_IF_ERROR(cudaMemcpy(b.mats, host.data(), sizeof(DeviceMatrix) * host.size(),
                                        cudaMemcpyHostToDevice));
  MDOPT_CUDA_RETURN_IF_ERROR(cudaMemcpy(b.tasks, tasks.data(), sizeof(Task) * tasks.size(),
                                        cudaMemcpyHostToDevice));
  out->reset(new FusedBucket(std::move(impl)));
  return {};
}

int64_t FusedBucket::workspace_bytes() const { return impl_->bytes; }

int FusedBucket::launches_per_step() const {
  const Impl& b = *impl_;
  int l = 2;  // gain values, pass 1
  if (b.rule.base == Base::kMuon) {
    l += 1;  // pass 2
    for (const auto& ns : b.ns) l += ns->launches();
  }
  l += 1;  // reduce tiles
  if (b.rule.gains != Gains::kNone) l += 2;  // gain Adam, new gain values
  if (!b.direct) l += 1;  // finish
  return l;
}

DeviceStatus FusedBucket::Step(const StepNumbers& s, void* stream_ptr) {
  Impl& b = *impl_;
  const UpdateRule& r = b.rule;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const dim3 per_matrix(Blocks(b.max_len), static_cast<unsigned>(b.count));
  const dim3 per_column(Blocks(b.max_n), static_cast<unsigned>(b.count));
  const unsigned tiles = static_cast<unsigned>(b.task_count);
  GainValuesKernel<<<per_matrix, kThreads, 0, stream>>>(b.mats, r);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const md::AdamScalars adam = md::MakeAdamScalars(r, s.lr, s.t);
  Pass1Kernel<<<tiles, kThreads, 0, stream>>>(b.mats, b.tasks, r, adam,
                                              static_cast<float>(r.momentum));
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (r.base == Base::kMuon) {
    for (const auto& ns : b.ns)
      if (DeviceStatus st = ns->Run(stream); !st.ok()) return st;
    Pass2Kernel<<<tiles, kThreads, 0, stream>>>(b.mats, b.tasks, r, static_cast<float>(s.lr),
                                                static_cast<float>(1.0 - s.lr * r.weight_decay));
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  ReduceTilesKernel<<<per_column, kThreads, 0, stream>>>(b.mats, r);
  MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (r.gains != Gains::kNone) {
    GainAdamKernel<<<per_matrix, kThreads, 0, stream>>>(b.mats, r,
                                                        md::MakeGainAdamScalars(r, s.gain_lr, s.t));
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    GainValuesKernel<<<per_matrix, kThreads, 0, stream>>>(b.mats, r);
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (!b.direct) {
    FinishKernel<<<tiles, kThreads, 0, stream>>>(b.mats, b.tasks, r);
    MDOPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return {};
}

bool DevicePresent(std::string* why_not) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    if (why_not) *why_not = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(e) + " (" +
                            cudaGetErrorString(e) + ")";
    cudaGetLastError();  // clear it: the failure is the answer, not an error to carry
    return false;
  }
  if (count == 0) {
    if (why_not) *why_not = "no CUDA device";
    return false;
  }
  return true;
}

}  // namespace mdopt::kernels::cuda
