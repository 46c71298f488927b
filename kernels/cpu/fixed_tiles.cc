#include "kernels/cpu/fixed_tiles.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>

namespace mdopt::kernels::fast {
namespace {

int64_t Blocks(int64_t extent, int64_t side) { return (extent + side - 1) / side; }

// Runs f(t) for t in [0, count) on the OpenMP team. Inside, each thread's own thread-count
// setting is 1, so the BLAS (OpenMP build: it asks omp_get_max_threads() and
// omp_in_parallel()) runs every tile on the calling thread alone, also for a team of one.
// Which thread takes which tile varies (dynamic schedule: diagonal tiles cost half); what a
// tile computes does not.
template <typename F>
void ForEachTile(int64_t count, const F& f) {
#pragma omp parallel
  {
    omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < count; ++t) f(t);
  }
}

// Block pair (i, j), i <= j, of the upper triangle of nb x nb blocks, numbered row by row.
void UpperPair(int64_t t, int64_t nb, int64_t* i, int64_t* j) {
  int64_t row = 0;
  while (t >= nb - row) {
    t -= nb - row;
    ++row;
  }
  *i = row;
  *j = row + t;
}

}  // namespace

void SyrkUpperTiled(bool trans, int64_t s, int64_t k, float alpha, const float* x, int64_t ldx,
                    float* c, int64_t ldc, int64_t batch, int64_t block) {
  const int64_t nb = Blocks(s, block), per = nb * (nb + 1) / 2;
  const int64_t x_size = (trans ? k : s) * ldx, c_size = s * ldc;
  ForEachTile(batch * per, [&](int64_t t) {
    int64_t bi = 0, bj = 0;
    UpperPair(t % per, nb, &bi, &bj);
    const float* xb = x + (t / per) * x_size;
    const int64_t i0 = bi * block, j0 = bj * block;
    const int mi = static_cast<int>(std::min(block, s - i0));
    const int nj = static_cast<int>(std::min(block, s - j0));
    // Row i of X (trans = false) or column i of X (trans = true).
    const float* xi = trans ? xb + i0 : xb + i0 * ldx;
    const float* xj = trans ? xb + j0 : xb + j0 * ldx;
    float* cij = c + (t / per) * c_size + i0 * ldc + j0;
    const int ki = static_cast<int>(k), lx = static_cast<int>(ldx), lc = static_cast<int>(ldc);
    if (bi == bj) {
      cblas_ssyrk(CblasRowMajor, CblasUpper, trans ? CblasTrans : CblasNoTrans, mi, ki, alpha, xi,
                  lx, 0.0f, cij, lc);
    } else if (trans) {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, mi, nj, ki, alpha, xi, lx, xj, lx, 0.0f,
                  cij, lc);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, nj, ki, alpha, xi, lx, xj, lx, 0.0f,
                  cij, lc);
    }
  });
}

void GemmTiled(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c,
               int64_t batch) {
  const int64_t rb = Blocks(m, kTileRows), cb = Blocks(n, kTileCols), per = rb * cb;
  ForEachTile(batch * per, [&](int64_t t) {
    const int64_t e = t / per, u = t % per;
    const int64_t i0 = (u / cb) * kTileRows, j0 = (u % cb) * kTileCols;
    const int mi = static_cast<int>(std::min(kTileRows, m - i0));
    const int nj = static_cast<int>(std::min(kTileCols, n - j0));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, nj, static_cast<int>(k), 1.0f,
                a + e * m * k + i0 * k, static_cast<int>(k), b + e * k * n + j0,
                static_cast<int>(n), 0.0f, c + e * m * n + i0 * n + j0, static_cast<int>(n));
  });
}

void GemmUpperTiled(int64_t s, int64_t k, const float* a, const float* b, float* c,
                    int64_t batch) {
  const int64_t nb = Blocks(s, kSymTile), per = nb * (nb + 1) / 2;
  ForEachTile(batch * per, [&](int64_t t) {
    const int64_t e = t / per;
    int64_t bi = 0, bj = 0;
    UpperPair(t % per, nb, &bi, &bj);
    const int64_t i0 = bi * kSymTile, j0 = bj * kSymTile;
    const int mi = static_cast<int>(std::min(kSymTile, s - i0));
    const int nj = static_cast<int>(std::min(kSymTile, s - j0));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, nj, static_cast<int>(k), 1.0f,
                a + e * s * k + i0 * k, static_cast<int>(k), b + e * k * s + j0,
                static_cast<int>(s), 0.0f, c + e * s * s + i0 * s + j0, static_cast<int>(s));
  });
}

void MirrorUpper(float* a, int64_t s, int64_t batch) {
  // Tiled so that both the rows read and the columns written stay in cache.
  constexpr int64_t kTile = 64;
  const int64_t tiles = Blocks(s, kTile);
#pragma omp parallel for schedule(dynamic) if (batch * s >= 256)
  for (int64_t t = 0; t < batch * tiles; ++t) {
    float* ab = a + (t / tiles) * s * s;
    const int64_t bi = t % tiles;
    for (int64_t bj = bi; bj < tiles; ++bj) {
      const int64_t i_end = std::min(s, (bi + 1) * kTile), j_end = std::min(s, (bj + 1) * kTile);
      for (int64_t i = bi * kTile; i < i_end; ++i)
        for (int64_t j = std::max(i + 1, bj * kTile); j < j_end; ++j) ab[j * s + i] = ab[i * s + j];
    }
  }
}

}  // namespace mdopt::kernels::fast
