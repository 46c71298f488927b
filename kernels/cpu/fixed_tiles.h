// Matrix products cut into a fixed grid of tiles that depends on the shapes alone, never on
// the number of threads. Each tile is one BLAS call made by one thread with BLAS threading
// off, and OpenMP threads share the tiles. A tile's result is then the same whichever thread
// computes it and however many there are, so products (and everything downstream: Newton-
// Schulz, the step) do not depend on threads=. A multi-threaded BLAS call gives no such
// promise: OpenBLAS's AVX2 (Haswell/Zen) kernels split the inner dimension by thread count.
#ifndef MDOPT_KERNELS_CPU_FIXED_TILES_H_
#define MDOPT_KERNELS_CPU_FIXED_TILES_H_

#include <cstdint>

namespace mdopt::kernels::fast {

// Tile sides: large enough that a single-threaded BLAS call runs near its peak (packing is a
// few percent of the work), small enough that a 1024-row product has 4-16 tiles to share.
inline constexpr int64_t kTileRows = 256;
inline constexpr int64_t kTileCols = 512;

// C (upper triangle of s x s, leading dimension ldc) = alpha * X Xᵀ with X s x k (trans =
// false, row-major, leading dimension ldx), or alpha * Xᵀ X with X k x s (trans = true).
// The strictly lower triangle is left as it was.
void SyrkUpperTiled(bool trans, int64_t s, int64_t k, float alpha, const float* x, int64_t ldx,
                    float* c, int64_t ldc);

// C (m x n) = A (m x k) B (k x n), all row-major and dense (leading dimensions k, n, n).
void GemmTiled(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c);

// C (s x s) = A (s x k) B (k x s), all row-major and dense (leading dimensions k, s, s), for
// a product known to be symmetric (two commuting symmetric matrices): only the kTileRows
// blocks on and above the diagonal are computed, about half the flops of a full product.
// Diagonal blocks are computed whole; MirrorUpper then makes C exactly symmetric. Below
// the diagonal blocks C is left as it was.
void GemmUpperTiled(int64_t s, int64_t k, const float* a, const float* b, float* c);

// Copies the upper triangle of the s x s matrix a onto its lower triangle.
void MirrorUpper(float* a, int64_t s);

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_FIXED_TILES_H_
