// The CUDA backend's stage kernels (stage_kernels.h). Each element's arithmetic is
// kernels/common/md_elementwise.h, the functions the CPU fast passes call, in the same order
// of operations, so the two devices differ only by what nvcc contracts into FMAs and by the
// order of the float64 sums (both fixed).
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/common/bf16.h"
#include "kernels/common/gain_param.h"
#include "kernels/common/grad_presence.h"
#include "kernels/common/md_elementwise.h"
#include "kernels/common/update_rule.h"
#include "kernels/cuda/stage_kernels.h"

// A kernel launch. tests/cuda/emu compiles this file for the CPU against an emulation of the
// CUDA runtime (MDOPT_CUDA_EMULATION), which runs the same kernels through emu::Launch.
#ifdef MDOPT_CUDA_EMULATION
#define MDOPT_LAUNCH(kernel, grid, block, stream, ...) \
  ::mdopt::emu::Launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })
#else
#define MDOPT_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace mdopt::kernels::cuda {
namespace {

constexpr int kWarps = kTileCols / 32;
constexpr int kCopyThreads = 256;

__device__ __forceinline__ double WarpSum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // lane 0 holds the sum, in a fixed tree order
}

// A fixed-order sum over a block of kTileCols threads; every thread gets the result.
__device__ double BlockSum(double v, double* sm /* kWarps + 1 */) {
  v = WarpSum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sm may still be read by a previous call
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += sm[w];
    sm[kWarps] = s;
  }
  __syncthreads();
  return sm[kWarps];
}

__device__ __forceinline__ Sphere SphereOf(const DevParam& p) { return static_cast<Sphere>(p.sphere); }
__device__ __forceinline__ Gains GainsOf(const DevParam& p) { return static_cast<Gains>(p.gains); }
__device__ __forceinline__ GainParam GainParamOf(const DevParam& p) {
  return static_cast<GainParam>(p.gain_param);
}

__device__ md::AdamScalars DeviceAdamScalars(const DevParam& p, double lr, int64_t t) {
  md::AdamScalars a;
  a.b1 = static_cast<float>(p.beta1);
  a.b2 = static_cast<float>(p.beta2);
  a.omb1 = static_cast<float>(1.0 - p.beta1);
  a.omb2 = static_cast<float>(1.0 - p.beta2);
  a.ibc1 = static_cast<float>(1.0 / (1.0 - pow(p.beta1, static_cast<double>(t))));
  a.ibc2 = static_cast<float>(1.0 / (1.0 - pow(p.beta2, static_cast<double>(t))));
  a.eps = static_cast<float>(p.eps);
  a.lr = static_cast<float>(lr);
  a.wdf = static_cast<float>(1.0 - lr * p.weight_decay);
  return a;
}

__device__ float LoadValue(const void* base, bool bf16, int64_t e) {
  return bf16 ? Bf16ToFloat(static_cast<const uint16_t*>(base)[e]) : static_cast<const float*>(base)[e];
}

// The partial sums of one tile: registers per column, shared memory per row and per tile.
struct TileSums {
  double col[kColChannels];
  double tile[kTileChannels];
};

// The model's copy of a master weight: bf16 (rounded to nearest even), or f32 (a mapped
// param's master is in block order, its model in the tensor's).
__device__ __forceinline__ void StoreModel(void* model, bool bf16, int64_t me, float v) {
  if (bf16) {
    static_cast<uint16_t*>(model)[me] = FloatToBf16(v);
  } else {
    static_cast<float*>(model)[me] = v;
  }
}

// D' of one element (pass 1 with Adam, pass 2 with Muon) into w; for a rule with neither
// sphere nor gains it is W, so the model copy is written now (at `me`, the element's place in
// the model tensor), else its square goes to the slice sums (channel 1 of rows, columns and
// the tile) for the projection.
__device__ __forceinline__ void PutDirection(float dn, int64_t e, int64_t me, bool direct, float* w,
                                             void* model, bool model_bf16,
                                             double (&rv)[kRowChannels], TileSums* acc) {
  w[e] = dn;
  if (direct) {
    if (model != nullptr) StoreModel(model, model_bf16, me, dn);
    return;
  }
  const double sq = static_cast<double>(dn) * dn;
  rv[1] = sq;
  acc->col[1] += sq;
  acc->tile[1] += sq;
}

// Whether a pass over slot s leaves it alone because its param has no gradient this step.
// The finite check (which decides it) and Init's passes never do.
__device__ __forceinline__ bool ParamSkipped(const DevTables& t, int32_t param, TilePass pass, bool init) {
  return !init && pass != TilePass::kCheck && pass != TilePass::kSliceSquares && t.param_skip[param] != 0;
}

__device__ void RowDone(const double (&rv)[kRowChannels], int r,
                        double (*row_sm)[kTileRows][kWarps]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < kRowChannels; ++c) {
    const double v = WarpSum(rv[c]);
    if (lane == 0) row_sm[c][r][warp] = v;
  }
}

template <TilePass P>
__global__ void __launch_bounds__(kTileCols) TileKernel(DevTables t, const DevTile* tiles, bool init) {
  __shared__ DevSlot s;
  __shared__ DevParam p;
  __shared__ double row_sm[kRowChannels][kTileRows][kWarps];
  __shared__ double tile_sm[kTileChannels][kWarps];
  const DevTile tile = tiles[blockIdx.x];
  if (threadIdx.x == 0) {
    s = t.slots[tile.slot];
    p = t.params[s.param];
  }
  __syncthreads();
  if (t.status->skip) return;  // uniform over the block
  if (ParamSkipped(t, s.param, P, init)) {
    // Its X may still go through a Newton-Schulz batch: zeros, whose result is never applied.
    if (P == TilePass::kPass1 && s.muon) {
      const int64_t jz = static_cast<int64_t>(tile.col_tile) * kTileCols + threadIdx.x;
      const int64_t iz = static_cast<int64_t>(tile.row_tile) * kTileRows;
      if (jz < s.n)
        for (int64_t i = iz; i < s.rows && i < iz + kTileRows; ++i) s.x[i * s.n + jz] = 0.0f;
    }
    return;
  }
  const Sphere sphere = SphereOf(p);
  const Gains gains = GainsOf(p);
  const GainParam gp = GainParamOf(p);
  const bool tangent = p.tangent && sphere != Sphere::kNone;
  if (P == TilePass::kPass2 && !s.muon) return;
  if (P == TilePass::kRescale && init && (sphere == Sphere::kNone || p.preserve_init)) return;
  if (P == TilePass::kWold && s.wold == nullptr) return;

  const int64_t n = s.n;
  const int64_t j = static_cast<int64_t>(tile.col_tile) * kTileCols + threadIdx.x;
  const bool valid = j < n;
  const int64_t i0 = static_cast<int64_t>(tile.row_tile) * kTileRows;
  const int rows_here = static_cast<int>(s.rows - i0 < kTileRows ? s.rows - i0 : kTileRows);
  const DevPointers ptr = t.ptrs[s.param];
  // Unmapped: the model's row i at model_off + i * n, like the slot's own buffers. Mapped
  // (interleaved blocks): the model pointers stay at the tensor's start and each row's place
  // comes from the row map (row_model_sm); the master is the slot's own, in block order.
  const bool mapped = s.mapped;
  const int64_t model_off = mapped ? 0 : s.model_off;
  float* w = s.aliases ? static_cast<float*>(ptr.param) + s.model_off : s.master;
  const bool model_bf16 = p.param_bf16;
  void* model = s.aliases ? nullptr
                : model_bf16 ? static_cast<void*>(static_cast<uint16_t*>(ptr.param) + model_off)
                             : static_cast<void*>(static_cast<float*>(ptr.param) + model_off);
  const void* grad = s.seg_grad;
  bool grad_bf16 = s.seg_grad_bf16;
  bool grad_mapped = false;  // read in place from a mapped param's gradient tensor
  if (grad == nullptr && ptr.grad != nullptr) {
    grad_bf16 = p.grad_bf16;
    grad = grad_bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(ptr.grad) + model_off)
                     : static_cast<const void*>(static_cast<const float*>(ptr.grad) + model_off);
    grad_mapped = mapped;
  }

  // Column values of this thread's column.
  float col = 1.0f;
  if (valid && HasColGains(gains)) col = md::EffectiveGain(gp, s.col_raw[j]);
  const float inv_col = 1.0f / col;
  const double scalar =
      HasScalarGain(gains) ? GainValue<double>(gp, static_cast<double>(s.scalar_raw[0])) : 1.0;
  float coef_col = 1.0f;
  if (P == TilePass::kPass1 && tangent) {
    if (sphere == Sphere::kFrobenius)
      coef_col = static_cast<float>(md::RadialRatio(s.radial_dot[0], s.radial_dd[0]));
    if (sphere == Sphere::kCol && valid)
      coef_col = static_cast<float>(md::RadialRatio(s.radial_dot[j], s.radial_dd[j]));
  }
  float col_mult = col;  // kRescale
  double frob = 1.0;
  if (P == TilePass::kRescale) {
    if (sphere == Sphere::kCol && valid)
      col_mult = static_cast<float>(col * md::ProjectionFactor(s.radius[j], s.slice_sq[j]));
    if (sphere == Sphere::kFrobenius) frob = md::ProjectionFactor(s.radius[0], s.slice_sq[0]);
  }
  const DevGroup g = t.groups[p.group];
  const int64_t step_t = t.param_t[s.param] + 1;  // the param's own count, this step included
  md::AdamScalars adam{};
  if (P == TilePass::kPass1 && !s.muon) adam = DeviceAdamScalars(p, g.lr, step_t);
  const float muon_step = static_cast<float>(g.lr * s.muon_scale);
  const float muon_wdf = static_cast<float>(1.0 - g.lr * p.weight_decay);
  const bool direct = s.direct;
  const bool norms = P == TilePass::kRescale && !init && s.wold != nullptr;

  // Row values, once per row of the tile (a float64 softplus per element would cost as much
  // as the pass's memory traffic): the row gain, the tangent coefficient, the rescale factor.
  __shared__ float row_gain_sm[kTileRows], row_coef_sm[kTileRows], row_mult_sm[kTileRows];
  // Mapped: the model tensor's element of each row's column 0.
  __shared__ int64_t row_model_sm[kTileRows];
  if (mapped && threadIdx.x < rows_here)
    row_model_sm[threadIdx.x] = t.row_maps[s.param].TensorRow(s.map_row0 + i0 + threadIdx.x) * n;
  constexpr bool kRowValues = P == TilePass::kRadial || P == TilePass::kPass1 ||
                              P == TilePass::kPass2 || P == TilePass::kRescale;
  if (kRowValues && threadIdx.x < rows_here) {
    const int64_t i = i0 + threadIdx.x;
    const float row_gain = HasRowGains(gains) ? md::EffectiveGain(gp, s.row_raw[i]) : 1.0f;
    row_gain_sm[threadIdx.x] = row_gain;
    row_coef_sm[threadIdx.x] =
        P == TilePass::kPass1 && tangent && sphere == Sphere::kRow
            ? static_cast<float>(md::RadialRatio(s.radial_dot[i], s.radial_dd[i]))
            : 1.0f;
    if (P == TilePass::kRescale) {
      double rm = scalar * row_gain * frob;
      if (sphere == Sphere::kRow) rm *= md::ProjectionFactor(s.radius[i], s.slice_sq[i]);
      row_mult_sm[threadIdx.x] = static_cast<float>(rm);
    }
  }
  __syncthreads();

  TileSums acc;
#pragma unroll
  for (int c = 0; c < kColChannels; ++c) acc.col[c] = 0.0;
#pragma unroll
  for (int c = 0; c < kTileChannels; ++c) acc.tile[c] = 0.0;

  for (int r = 0; r < rows_here; ++r) {
    const int64_t i = i0 + r;
    const int64_t e = i * n + j;
    const int64_t me = mapped ? row_model_sm[r] + j : e;  // the model tensors' element
    const int64_t ge = grad_mapped ? me : e;              // the gradient's
    double rv[kRowChannels] = {0.0, 0.0};
    const float row_gain = kRowValues ? row_gain_sm[r] : 1.0f;
    const double row_scale = scalar * row_gain;  // W_ij = D_ij * row_scale * col_j
    const float inv_row = md::InverseRowScale(row_scale);
    const float sr = static_cast<float>(row_scale);
    if (valid) {
      if constexpr (P == TilePass::kSliceSquares) {
        const float v = w[e];
        const double sq = static_cast<double>(v) * v;
        rv[0] = sq;
        acc.col[0] += sq;
        acc.tile[0] += sq;
      } else if constexpr (P == TilePass::kCheck) {
        // No gradient here (NULL, grads not segmented): nothing to add.
        const double v = grad != nullptr ? static_cast<double>(LoadValue(grad, grad_bf16, ge)) : 0.0;
        acc.tile[0] += v * v;
      } else if constexpr (P == TilePass::kWold) {
        s.wold[e] = w[e];
      } else if constexpr (P == TilePass::kRadial) {
        const float gv = LoadValue(grad, grad_bf16, ge);
        const float d = md::Direction(w[e], inv_row, inv_col);
        const float gd = md::DirectionGrad(gv, sr, col);
        const double dot = static_cast<double>(gd) * d, dd = static_cast<double>(d) * d;
        rv[0] = dot;
        rv[1] = dd;
        acc.col[0] += dot;
        acc.col[1] += dd;
        acc.tile[0] += dot;
        acc.tile[1] += dd;
      } else if constexpr (P == TilePass::kPass1) {
        const float gv = LoadValue(grad, grad_bf16, ge);
        const float wv = w[e];
        const float d = md::Direction(wv, inv_row, inv_col);
        if (gains != Gains::kNone) {
          const float dg = md::GainGradTerm(wv, inv_row, inv_col, gv);
          rv[0] = static_cast<double>(dg * col);
          acc.tile[0] += static_cast<double>(dg);
          acc.col[0] += static_cast<double>(dg * sr);
        }
        const float row_coef = row_coef_sm[r];
        const float gd = tangent ? md::TangentDirectionGrad(gv, sr, col, row_coef, coef_col, d)
                                 : md::DirectionGrad(gv, sr, col);
        if (s.muon) {
          const float b = md::MuonMomentum(p.momentum, s.state0[e], gd);
          s.state0[e] = b;
          s.x[e] = md::MuonInput(p.nesterov, p.momentum, b, gd);
        } else {
          const float m1 = md::AdamFirstMoment(adam, s.state0[e], gd);
          const float m2 = md::AdamSecondMoment(adam, s.state1[e], gd);
          s.state0[e] = m1;
          s.state1[e] = m2;
          const float dn = md::AdamApply(adam, d, m1, m2);
          PutDirection(dn, e, me, direct, w, model, model_bf16, rv, &acc);
        }
      } else if constexpr (P == TilePass::kPass2) {
        const float dn =
            md::MuonApply(md::Direction(w[e], inv_row, inv_col), muon_wdf, muon_step, s.x[e]);
        PutDirection(dn, e, me, direct, w, model, model_bf16, rv, &acc);
      } else if constexpr (P == TilePass::kRescale) {
        float wv = w[e];
        if (!direct) {
          wv = md::Rescale(wv, row_mult_sm[r], col_mult);
          w[e] = wv;
          if (model != nullptr) StoreModel(model, model_bf16, me, wv);
        }
        if (norms) {
          const double ow = s.wold[e], diff = static_cast<double>(wv) - ow;
          acc.tile[0] += diff * diff;
          acc.tile[1] += ow * ow;  // ||W||^2 before the step
        }
      }
    }
    RowDone(rv, r, row_sm);
  }

  // The tile's partials into the scratch.
  __syncthreads();
  for (int q = threadIdx.x; q < kRowChannels * rows_here; q += kTileCols) {
    const int c = q / rows_here, r = q % rows_here;
    double sum = 0.0;
    for (int wp = 0; wp < kWarps; ++wp) sum += row_sm[c][r][wp];
    t.row_part[c * t.row_part_stride + s.row_part + (i0 + r) * s.col_tiles + tile.col_tile] = sum;
  }
  if (valid) {
#pragma unroll
    for (int c = 0; c < kColChannels; ++c)
      t.col_part[c * t.col_part_stride + s.col_part + tile.row_tile * n + j] = acc.col[c];
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < kTileChannels; ++c) {
    const double v = WarpSum(acc.tile[c]);
    if (lane == 0) tile_sm[c][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < kTileChannels) {
    double sum = 0.0;
    for (int wp = 0; wp < kWarps; ++wp) sum += tile_sm[threadIdx.x][wp];
    t.tile_part[threadIdx.x * t.tile_part_stride + s.tile_part + tile.index] = sum;
  }
}

// A combine launch spreads each slot's rows and columns over the grid's y blocks (a single
// large matrix's column partials are megabytes: one block would read them alone); the
// slot's totals are the y = 0 block's.
__device__ __forceinline__ int64_t First() {
  return static_cast<int64_t>(blockIdx.y) * kTileCols + threadIdx.x;
}
__device__ __forceinline__ int64_t Stride() { return static_cast<int64_t>(gridDim.y) * kTileCols; }

// Sums of one slot's partials in tile order.
struct SlotPartials {
  const DevTables& t;
  const DevSlot& s;
  __device__ double Row(int c, int64_t i) const {
    const double* part = t.row_part + c * t.row_part_stride + s.row_part + i * s.col_tiles;
    double sum = 0.0;
    for (int k = 0; k < s.col_tiles; ++k) sum += part[k];
    return sum;
  }
  __device__ double Col(int c, int64_t j) const {
    const double* part = t.col_part + c * t.col_part_stride + s.col_part + j;
    double sum = 0.0;
    for (int k = 0; k < s.row_tiles; ++k) sum += part[k * s.n];
    return sum;
  }
  // Every thread of the block must call it.
  __device__ double Tiles(int c, double* sm) const {
    const double* part = t.tile_part + c * t.tile_part_stride + s.tile_part;
    const int64_t count = static_cast<int64_t>(s.row_tiles) * s.col_tiles;
    double sum = 0.0;
    for (int64_t k = threadIdx.x; k < count; k += kTileCols) sum += part[k];
    return BlockSum(sum, sm);
  }
};

// One slot's sums of a pass: `c` is the channel of the squares (the pass's sq channel).
__device__ void CombineSliceSquares(const SlotPartials& sp, Sphere sphere, int c, double* sm) {
  const DevSlot& s = sp.s;
  if (sphere == Sphere::kRow)
    for (int64_t i = First(); i < s.rows; i += Stride()) s.slice_sq[i] = sp.Row(c, i);
  if (sphere == Sphere::kCol)
    for (int64_t j = First(); j < s.n; j += Stride()) s.slice_sq[j] = sp.Col(c, j);
  if (sphere == Sphere::kFrobenius && blockIdx.y == 0) {
    const double v = sp.Tiles(c, sm);
    if (threadIdx.x == 0) s.slice_sq[0] = v;
  }
}

template <TilePass P>
__global__ void __launch_bounds__(kTileCols) CombineKernel(DevTables t, const int32_t* slots, bool init) {
  __shared__ DevSlot s;
  __shared__ DevParam p;
  __shared__ double sm[kWarps + 1];
  if (threadIdx.x == 0) {
    s = t.slots[slots[blockIdx.x]];
    p = t.params[s.param];
  }
  __syncthreads();
  if (t.status->skip) return;
  if (ParamSkipped(t, s.param, P, init)) {
    // The counters of a skipped slot: not applied, marked skipped (2), no norms.
    if (P == TilePass::kRescale && s.holds && blockIdx.y == 0 && threadIdx.x == 0) {
      s.counters[0] = 2.0;
      s.counters[1] = 0.0;
      s.counters[2] = 0.0;
    }
    return;
  }
  const SlotPartials sp{t, s};
  const Sphere sphere = SphereOf(p);
  const Gains gains = GainsOf(p);
  if constexpr (P == TilePass::kSliceSquares) {
    if (!s.holds || sphere == Sphere::kNone) return;
    CombineSliceSquares(sp, sphere, 0, sm);
  } else if constexpr (P == TilePass::kCheck) {
    if (blockIdx.y != 0) return;
    const double v = sp.Tiles(0, sm);
    if (threadIdx.x == 0) s.check[0] = v;
  } else if constexpr (P == TilePass::kRadial) {
    if (!p.tangent || sphere == Sphere::kNone || !s.holds) return;
    if (sphere == Sphere::kRow) {
      for (int64_t i = First(); i < s.rows; i += Stride()) {
        s.radial_dot[i] = sp.Row(0, i);
        s.radial_dd[i] = sp.Row(1, i);
      }
    } else if (sphere == Sphere::kCol) {
      for (int64_t j = First(); j < s.n; j += Stride()) {
        s.radial_dot[j] = sp.Col(0, j);
        s.radial_dd[j] = sp.Col(1, j);
      }
    } else if (blockIdx.y == 0) {
      const double dot = sp.Tiles(0, sm);
      const double dd = sp.Tiles(1, sm);
      if (threadIdx.x == 0) {
        s.radial_dot[0] = dot;
        s.radial_dd[0] = dd;
      }
    }
  } else if constexpr (P == TilePass::kPass1) {
    if (!s.holds) return;
    const GainParam gp = GainParamOf(p);
    const double scalar =
        HasScalarGain(gains) ? GainValue<double>(gp, static_cast<double>(s.scalar_raw[0])) : 1.0;
    if (HasRowGains(gains))
      for (int64_t i = First(); i < s.rows; i += Stride()) s.row_grad[i] = sp.Row(0, i) * scalar;
    if (HasColGains(gains))
      for (int64_t j = First(); j < s.n; j += Stride()) s.col_grad[j] = sp.Col(0, j);
    if (HasScalarGain(gains) && blockIdx.y == 0) {
      const double v = sp.Tiles(0, sm);
      if (threadIdx.x == 0) s.scalar_grad[0] = v;
    }
    if (!s.muon && !s.direct && sphere != Sphere::kNone) CombineSliceSquares(sp, sphere, 1, sm);
  } else if constexpr (P == TilePass::kPass2) {
    if (!s.holds || !s.muon || s.direct || sphere == Sphere::kNone) return;
    CombineSliceSquares(sp, sphere, 1, sm);
  } else if constexpr (P == TilePass::kRescale) {
    if (init || !s.holds || blockIdx.y != 0) return;
    double dsq = 0.0, wsq = 0.0;
    if (s.wold != nullptr) {
      dsq = sp.Tiles(0, sm);
      wsq = sp.Tiles(1, sm);
    }
    if (threadIdx.x == 0) {
      s.counters[0] = 1.0;
      s.counters[1] = dsq;
      s.counters[2] = wsq;
    }
  }
}

// Elements [e0, e1) from src to dst, converting between the two dtypes bit for bit when
// they agree (NaN payloads included), bf16 -> f32 exactly, f32 -> bf16 to nearest even.
__device__ __forceinline__ void MoveElements(const char* src, bool src_bf16, char* dst, bool dst_bf16,
                                             int64_t e0, int64_t e1) {
  if (src_bf16 == dst_bf16) {  // bit for bit
    if (dst_bf16) {
      for (int64_t e = e0 + threadIdx.x; e < e1; e += kCopyThreads)
        reinterpret_cast<uint16_t*>(dst)[e] = reinterpret_cast<const uint16_t*>(src)[e];
    } else {
      for (int64_t e = e0 + threadIdx.x; e < e1; e += kCopyThreads)
        reinterpret_cast<uint32_t*>(dst)[e] = reinterpret_cast<const uint32_t*>(src)[e];
    }
  } else if (src_bf16) {  // bf16 -> f32: exact
    for (int64_t e = e0 + threadIdx.x; e < e1; e += kCopyThreads)
      reinterpret_cast<float*>(dst)[e] = Bf16ToFloat(reinterpret_cast<const uint16_t*>(src)[e]);
  } else {  // f32 -> bf16: round to nearest even
    for (int64_t e = e0 + threadIdx.x; e < e1; e += kCopyThreads)
      reinterpret_cast<uint16_t*>(dst)[e] = FloatToBf16(reinterpret_cast<const float*>(src)[e]);
  }
}

// Elements [e0, e1) of a span between a mapped param's tensor and a buffer: element e of the
// span is block-order element tensor0 + e, found in the tensor through the row map (rows of
// n elements). tensor_src: from the tensor to the buffer, else back. Conversions as
// MoveElements.
__device__ void MoveMapped(const char* src, bool src_bf16, char* dst, bool dst_bf16, int64_t e0,
                           int64_t e1, const RowMap& map, int64_t n, int64_t tensor0,
                           bool tensor_src) {
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kCopyThreads) {
    const int64_t te = map.TensorElement(tensor0 + e, n);
    const int64_t si = tensor_src ? te : e, di = tensor_src ? e : te;
    if (src_bf16 == dst_bf16) {  // bit for bit
      if (dst_bf16) {
        reinterpret_cast<uint16_t*>(dst)[di] = reinterpret_cast<const uint16_t*>(src)[si];
      } else {
        reinterpret_cast<uint32_t*>(dst)[di] = reinterpret_cast<const uint32_t*>(src)[si];
      }
    } else if (src_bf16) {
      reinterpret_cast<float*>(dst)[di] = Bf16ToFloat(reinterpret_cast<const uint16_t*>(src)[si]);
    } else {
      reinterpret_cast<uint16_t*>(dst)[di] = FloatToBf16(reinterpret_cast<const float*>(src)[si]);
    }
  }
}

__global__ void CopyKernel(const CopyChunk* chunks, const DevPointers* ptrs, const void* src_base,
                           bool src_bf16, void* dst_base, bool dst_bf16) {
  const CopyChunk c = chunks[blockIdx.x];
  char* dst = static_cast<char*>(c.dst_param >= 0 ? ptrs[c.dst_param].param : dst_base);
  const int db = dst_bf16 ? 2 : 4, sb = src_bf16 ? 2 : 4;
  dst += c.dst * db;
  if (c.zero) {
    for (int64_t e = threadIdx.x; e < c.count * db / 2; e += kCopyThreads)
      reinterpret_cast<uint16_t*>(dst)[e] = 0;
    return;
  }
  const char* src = static_cast<const char*>(
      c.src_param >= 0 ? (c.src_grad ? ptrs[c.src_param].grad : ptrs[c.src_param].param) : src_base);
  MoveElements(src + c.src * sb, src_bf16, dst, dst_bf16, 0, c.count);
}

// One piece of one rank block of one span per CUDA block. The span is found by a binary
// search over first_block (thread 0, shared with the block), the rank block's place in the
// staging by the window's segment map (SegmentView::Start, a binary search over the owned
// parts): nothing per rank is stored.
__global__ void SpanCopyKernel(const DevCopySpan* spans, int32_t count, SegmentView map,
                               const DevPointers* ptrs, const RowMap* row_maps, bool grads,
                               void* buffer, bool buffer_bf16, bool to_buffer) {
  __shared__ DevCopySpan d;
  __shared__ SpanBlock blk;
  __shared__ int64_t piece;
  if (threadIdx.x == 0) {
    const int64_t b = blockIdx.x;
    int32_t lo = 0, hi = count - 1;  // the last span whose first_block <= b
    while (lo < hi) {
      const int32_t mid = lo + (hi - lo + 1) / 2;
      if (spans[mid].first_block <= b) lo = mid; else hi = mid - 1;
    }
    d = spans[lo];
    const int64_t local = b - d.first_block;
    const int64_t ordinal = local / d.pieces;
    piece = local % d.pieces;
    if (d.span.blocks > 0) {
      // The skipped rank has no blocks in the launch: ordinals past it are one rank further.
      const int64_t skip = d.span.skip_rank;
      const int r = static_cast<int>(ordinal + (skip >= 0 && ordinal >= skip ? 1 : 0));
      blk = BlockOf(d.span, map, r);
    } else {
      blk.tensor = d.span.tensor_offset;
      blk.buffer = d.span.buffer_offset;
      blk.real = d.span.count;
      blk.pad = d.span.pad;
    }
  }
  __syncthreads();
  const int64_t e0 = piece * kCopyPiece;
  const int64_t len = to_buffer ? blk.real + blk.pad : blk.real;  // unpacking skips padding
  const int64_t e1 = e0 + kCopyPiece < len ? e0 + kCopyPiece : len;
  if (e0 >= e1) return;
  const int bb = buffer_bf16 ? 2 : 4, tb = d.tensor_bf16 ? 2 : 4;
  char* buf = static_cast<char*>(buffer) + blk.buffer * bb;
  const DevPointers& p = ptrs[d.span.param];
  if (to_buffer) {
    const char* base = static_cast<const char*>(grads ? p.grad : p.param);
    // A NULL gradient (no gradient on this rank): its elements go as zeros, like padding.
    const int64_t real_end = base == nullptr ? e0 : blk.real < e1 ? blk.real : e1;
    if (e0 < real_end) {
      if (d.mapped) {
        MoveMapped(base, d.tensor_bf16, buf, buffer_bf16, e0, real_end, row_maps[d.span.param],
                   d.n, blk.tensor, /*tensor_src=*/true);
      } else {
        MoveElements(base + blk.tensor * tb, d.tensor_bf16, buf, buffer_bf16, e0, real_end);
      }
    }
    // Padding: zeros, written as 16-bit words of the buffer's dtype.
    const int64_t z0 = (e0 > real_end ? e0 : real_end) * bb / 2, z1 = e1 * bb / 2;
    for (int64_t e = z0 + threadIdx.x; e < z1; e += kCopyThreads) reinterpret_cast<uint16_t*>(buf)[e] = 0;
  } else {
    if (d.mapped) {
      MoveMapped(buf, buffer_bf16, static_cast<char*>(p.param), d.tensor_bf16, e0, e1,
                 row_maps[d.span.param], d.n, blk.tensor, /*tensor_src=*/false);
    } else {
      char* dst = static_cast<char*>(p.param) + blk.tensor * tb;
      MoveElements(buf, buffer_bf16, dst, d.tensor_bf16, e0, e1);
    }
  }
}

__global__ void __launch_bounds__(kTileCols) GainsKernel(DevTables t, const int32_t* slots) {
  __shared__ DevSlot s;
  __shared__ DevParam p;
  if (threadIdx.x == 0) {
    s = t.slots[slots[blockIdx.x]];
    p = t.params[s.param];
  }
  __syncthreads();
  if (t.status->skip || !s.holds || t.param_skip[s.param]) return;
  const Gains gains = GainsOf(p);
  if (gains == Gains::kNone) return;
  const GainParam gp = GainParamOf(p);
  const double tt = static_cast<double>(t.param_t[s.param] + 1);
  const md::GainAdamScalars gs{p.beta1, p.beta2, 1.0 - pow(p.beta1, tt), 1.0 - pow(p.beta2, tt),
                               p.eps, t.groups[p.group].gain_lr};
  if (HasRowGains(gains))
    for (int64_t i = threadIdx.x; i < s.rows; i += kTileCols)
      md::GainAdamElement(gp, gs, s.row_grad[i], s.row_raw + i, s.row_m + i, s.row_v + i);
  // The column and scalar gains of a matrix of K row blocks: each block's replica steps with
  // the gradient summed over the K blocks in block order (the CPU backend's order), so the
  // replicas stay bitwise equal. Only the raw gains and moments are written here, never a
  // gradient, so the blocks of this launch read each other's sums without a race.
  const DevSlot* peers = t.slots + (slots[blockIdx.x] - s.gain_block);
  auto shared = [&](const double* own, int64_t j, double* DevSlot::*field) {
    if (s.gain_blocks < 2) return own[j];
    double g = (peers[0].*field)[j];
    for (int32_t k = 1; k < s.gain_blocks; ++k) g += (peers[k].*field)[j];
    return g;
  };
  if (HasColGains(gains))
    for (int64_t j = threadIdx.x; j < s.n; j += kTileCols)
      md::GainAdamElement(gp, gs, shared(s.col_grad, j, &DevSlot::col_grad), s.col_raw + j,
                          s.col_m + j, s.col_v + j);
  if (HasScalarGain(gains) && threadIdx.x == 0)
    md::GainAdamElement(gp, gs, shared(s.scalar_grad, 0, &DevSlot::scalar_grad), s.scalar_raw,
                        s.scalar_m, s.scalar_v);
}

// The record of a slot: column-gain gradients, the scalar-gain gradient, the squared norms
// of frobenius/column slices; radial: the dots <G_D, D> then <D, D> (frobenius/column).
__global__ void __launch_bounds__(kTileCols) RecordKernel(DevTables t, const int32_t* slots, bool radial,
                                                          bool to_record) {
  __shared__ DevSlot s;
  __shared__ DevParam p;
  if (threadIdx.x == 0) {
    s = t.slots[slots[blockIdx.x]];
    p = t.params[s.param];
  }
  __syncthreads();
  if (t.status->skip || !s.cross_slot || t.param_skip[s.param]) return;
  const Sphere sphere = SphereOf(p);
  const Gains gains = GainsOf(p);
  const bool partial_slices = sphere == Sphere::kFrobenius || sphere == Sphere::kCol;
  const int64_t slices = sphere == Sphere::kCol ? s.n : 1;
  auto move = [&](double* rec, double* mine, int64_t count) {
    for (int64_t k = threadIdx.x; k < count; k += kTileCols) {
      if (to_record) {
        rec[k] = mine[k];
      } else {
        mine[k] = rec[k];
      }
    }
  };
  if (radial) {
    if (!p.tangent || !partial_slices || s.radial == nullptr) return;
    move(s.radial, s.radial_dot, slices);
    move(s.radial + slices, s.radial_dd, slices);
    return;
  }
  double* rec = s.cross;
  if (HasColGains(gains)) {
    move(rec, s.col_grad, s.n);
    rec += s.n;
  }
  if (HasScalarGain(gains)) {
    move(rec, s.scalar_grad, 1);
    rec += 1;
  }
  if (partial_slices) move(rec, s.slice_sq, slices);
}

__global__ void ParamCheckKernel(DevTables t, const DevParamCheck* entries, int32_t count,
                                 const int32_t* slot_list, double* check, int64_t params) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const DevParamCheck c = entries[i];
  double total = 0.0;
  for (int32_t q = c.q0; q < c.q1; ++q) total += t.slots[slot_list[q]].check[0];
  if (c.sets) {
    check[c.param] = total;
    check[params + c.param] = GradPresence(t.ptrs[c.param].grad);
  } else {
    check[c.param] += total;
  }
}

__global__ void __launch_bounds__(kTileCols) ApplyCheckKernel(DevTables t, const double* check,
                                                              int64_t count, bool grads_agree) {
  __shared__ double sm[kWarps + 1];
  __shared__ long long bad_sm[kTileCols], mixed_sm[kTileCols];
  double sum = 0.0;
  long long bad = count, mixed = count;
  for (int64_t i = threadIdx.x; i < count; i += kTileCols) {
    const double v = check[i];
    sum += v;
    if (!isfinite(v) && bad == count) bad = i;
    const double presence = check[count + i];
    const bool some = SomeRankHasGrad(presence);
    t.param_skip[i] = some ? 0 : 1;
    if (grads_agree && some && SomeRankLacksGrad(presence) && mixed == count) mixed = i;
  }
  const double total = BlockSum(sum, sm);
  bad_sm[threadIdx.x] = bad;
  mixed_sm[threadIdx.x] = mixed;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long first = count, first_mixed = count;
    for (int k = 0; k < kTileCols; ++k) {
      first = bad_sm[k] < first ? bad_sm[k] : first;
      first_mixed = mixed_sm[k] < first_mixed ? mixed_sm[k] : first_mixed;
    }
    DevStatus* st = t.status;
    st->grad_norm = sqrt(total);
    st->skip = first < count || first_mixed < count ? 1 : 0;
    st->bad_param = first < count ? first : -1;
    st->disagree_param = first_mixed < count ? first_mixed : -1;
  }
}

__global__ void BeginStepKernel(DevStatus* st) {
  st->skip = 0;
  st->grad_norm = 0.0;
  st->bad_param = -1;
  st->disagree_param = -1;
}

__global__ void __launch_bounds__(kTileCols) EndStepKernel(DevTables t, int64_t params) {
  if (t.status->skip) return;
  for (int64_t i = threadIdx.x; i < params; i += kTileCols) t.param_t[i] += t.param_skip[i] ? 0 : 1;
  if (threadIdx.x == 0) ++t.status->t;
}

__global__ void FillKernel(float* data, int64_t n, float value) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    data[e] = value;
}

int Err() { return static_cast<int>(cudaGetLastError()); }

// A grid of `count` blocks: at most 2^31 - 1 in x (more is a plan too large for one bucket).
bool GridOk(int64_t count) { return count > 0 && count <= 0x7fffffff; }

template <TilePass P>
int Tiles(const DevTables& t, const DevTile* tiles, int64_t count, bool init, cudaStream_t st) {
  MDOPT_LAUNCH(TileKernel<P>, static_cast<unsigned>(count), kTileCols, st, t, tiles, init);
  return Err();
}

template <TilePass P>
int Combine(const DevTables& t, const int32_t* slots, int32_t count, int32_t spread, bool init,
            cudaStream_t st) {
  MDOPT_LAUNCH(CombineKernel<P>, dim3(static_cast<unsigned>(count), static_cast<unsigned>(spread)),
               kTileCols, st, t, slots, init);
  return Err();
}

}  // namespace

int LaunchTiles(TilePass pass, const DevTables& t, const DevTile* tiles, int64_t count, bool init,
                void* stream) {
  if (count == 0) return 0;
  if (!GridOk(count)) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (pass) {
    case TilePass::kSliceSquares: return Tiles<TilePass::kSliceSquares>(t, tiles, count, init, st);
    case TilePass::kRadial: return Tiles<TilePass::kRadial>(t, tiles, count, init, st);
    case TilePass::kCheck: return Tiles<TilePass::kCheck>(t, tiles, count, init, st);
    case TilePass::kWold: return Tiles<TilePass::kWold>(t, tiles, count, init, st);
    case TilePass::kPass1: return Tiles<TilePass::kPass1>(t, tiles, count, init, st);
    case TilePass::kPass2: return Tiles<TilePass::kPass2>(t, tiles, count, init, st);
    case TilePass::kRescale: return Tiles<TilePass::kRescale>(t, tiles, count, init, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int LaunchCombine(TilePass pass, const DevTables& t, const int32_t* slots, int32_t count,
                  int32_t spread, bool init, void* stream) {
  if (count <= 0) return 0;
  spread = spread < 1 ? 1 : (spread > 65535 ? 65535 : spread);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (pass) {
    case TilePass::kSliceSquares: return Combine<TilePass::kSliceSquares>(t, slots, count, spread, init, st);
    case TilePass::kRadial: return Combine<TilePass::kRadial>(t, slots, count, spread, init, st);
    case TilePass::kCheck: return Combine<TilePass::kCheck>(t, slots, count, spread, init, st);
    case TilePass::kWold: return 0;
    case TilePass::kPass1: return Combine<TilePass::kPass1>(t, slots, count, spread, init, st);
    case TilePass::kPass2: return Combine<TilePass::kPass2>(t, slots, count, spread, init, st);
    case TilePass::kRescale: return Combine<TilePass::kRescale>(t, slots, count, spread, init, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int LaunchCopy(const CopyChunk* chunks, int64_t count, const DevPointers* ptrs, const void* src_base,
               bool src_bf16, void* dst_base, bool dst_bf16, void* stream) {
  if (count == 0) return 0;
  if (!GridOk(count)) return static_cast<int>(cudaErrorInvalidConfiguration);
  MDOPT_LAUNCH(CopyKernel, static_cast<unsigned>(count), kCopyThreads, static_cast<cudaStream_t>(stream),
      chunks, ptrs, src_base, src_bf16, dst_base, dst_bf16);
  return Err();
}

int LaunchSpanCopy(const DevCopySpan* spans, int32_t count, int64_t blocks, const SegmentView& map,
                   const DevPointers* ptrs, const RowMap* row_maps, bool grads, void* buffer,
                   bool buffer_bf16, bool to_buffer, void* stream) {
  if (count <= 0 || blocks == 0) return 0;
  if (!GridOk(blocks)) return static_cast<int>(cudaErrorInvalidConfiguration);
  MDOPT_LAUNCH(SpanCopyKernel, static_cast<unsigned>(blocks), kCopyThreads,
      static_cast<cudaStream_t>(stream), spans, count, map, ptrs, row_maps, grads, buffer,
      buffer_bf16, to_buffer);
  return Err();
}

int LaunchGains(const DevTables& t, const int32_t* slots, int32_t count, void* stream) {
  if (count <= 0) return 0;
  MDOPT_LAUNCH(GainsKernel, static_cast<unsigned>(count), kTileCols, static_cast<cudaStream_t>(stream), t, slots);
  return Err();
}

int LaunchRecord(const DevTables& t, const int32_t* slots, int32_t count, bool radial, bool to_record,
                 void* stream) {
  if (count <= 0) return 0;
  MDOPT_LAUNCH(RecordKernel, static_cast<unsigned>(count), kTileCols, static_cast<cudaStream_t>(stream),
      t, slots, radial, to_record);
  return Err();
}

int LaunchParamCheck(const DevTables& t, const DevParamCheck* entries, int32_t count,
                     const int32_t* slot_list, double* check, int64_t params, void* stream) {
  if (count <= 0) return 0;
  const int64_t blocks = (count + 255) / 256;
  MDOPT_LAUNCH(ParamCheckKernel, static_cast<unsigned>(blocks), 256, static_cast<cudaStream_t>(stream),
      t, entries, count, slot_list, check, params);
  return Err();
}

int LaunchApplyCheck(const DevTables& t, const double* check, int64_t count, bool grads_agree,
                     void* stream) {
  MDOPT_LAUNCH(ApplyCheckKernel, 1, kTileCols, static_cast<cudaStream_t>(stream), t, check, count,
               grads_agree);
  return Err();
}

int LaunchBeginStep(const DevTables& t, void* stream) {
  MDOPT_LAUNCH(BeginStepKernel, 1, 1, static_cast<cudaStream_t>(stream), t.status);
  return Err();
}

int LaunchEndStep(const DevTables& t, int64_t params, void* stream) {
  MDOPT_LAUNCH(EndStepKernel, 1, kTileCols, static_cast<cudaStream_t>(stream), t, params);
  return Err();
}

int LaunchFill(float* data, int64_t n, float value, void* stream) {
  if (n <= 0) return 0;
  const int64_t blocks = (n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096;
  MDOPT_LAUNCH(FillKernel, static_cast<unsigned>(blocks), 256, static_cast<cudaStream_t>(stream), data, n, value);
  return Err();
}

}  // namespace mdopt::kernels::cuda
