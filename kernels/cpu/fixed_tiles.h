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
// Blocks of the Gram form's s x s products (GemmUpperTiled, and its A^2): smaller, so that a
// 256 x 256 Gram matrix is 3 tiles rather than one (both threads busy on small matrices) and
// the diagonal blocks, computed whole, waste less (36 tiles at s = 1024 for the 32 that the
// upper triangle needs, against 10 for 8 with 256). Measured as fast per flop as 256 at
// s = 1024, with k = s.
inline constexpr int64_t kSymTile = 128;

// Every product below takes a `batch` of same-shape problems, operands stored one after the
// other (matrix b of an operand at b times its size, the size counted with its leading
// dimension), and shares the tiles of all of them out as one list: small matrices keep
// every thread busy. Each tile is the same BLAS call whatever the batch, so a matrix's
// result is the same bits alone or in a batch.

// C (upper triangle of s x s, leading dimension ldc) = alpha * X Xᵀ with X s x k (trans =
// false, row-major, leading dimension ldx), or alpha * Xᵀ X with X k x s (trans = true).
// The strictly lower triangle is left as it was. Tiles are block x block.
void SyrkUpperTiled(bool trans, int64_t s, int64_t k, float alpha, const float* x, int64_t ldx,
                    float* c, int64_t ldc, int64_t batch = 1, int64_t block = kTileRows);

// C (m x n) = A (m x k) B (k x n), all row-major and dense (leading dimensions k, n, n).
void GemmTiled(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c,
               int64_t batch = 1);

// C (s x s) = A (s x k) B (k x s), all row-major and dense (leading dimensions k, s, s), for
// a product known to be symmetric (two commuting symmetric matrices): only the kSymTile
// blocks on and above the diagonal are computed, about half the flops of a full product.
// Diagonal blocks are computed whole; MirrorUpper then makes C exactly symmetric. Below
// the diagonal blocks C is left as it was.
void GemmUpperTiled(int64_t s, int64_t k, const float* a, const float* b, float* c,
                    int64_t batch = 1);

// Copies the upper triangle of the s x s matrix a (each of `batch` dense ones) onto its
// lower triangle.
void MirrorUpper(float* a, int64_t s, int64_t batch = 1);

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_FIXED_TILES_H_
