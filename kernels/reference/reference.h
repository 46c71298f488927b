// The float64 reference of the math (docs/ARCHITECTURE.md): plain loops, one whole matrix at
// a time, every step of the math a separate pass. It is the oracle every faster path is held
// to, and it is itself held to an independent implementation's trajectories in
// tests/data/md-vectors.json (tests/unit/reference_vectors_test).
// Nothing here is tuned for speed; clarity over cleverness.
#ifndef MDOPT_KERNELS_REFERENCE_REFERENCE_H_
#define MDOPT_KERNELS_REFERENCE_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "kernels/common/update_rule.h"

namespace mdopt::kernels::ref {

// Raw gains and their Adam moments.
struct GainState {
  std::vector<double> raw, exp_avg, exp_avg_sq;
};

// Everything the optimizer keeps for one m x n matrix (a 1-D tensor is a 1 x n matrix with
// sphere none and no gains).
struct MatrixState {
  int64_t m = 0, n = 0;
  std::vector<double> w;                    // the weights W = g_row (x) D (x) g_col
  std::vector<double> momentum;             // muon
  std::vector<double> exp_avg, exp_avg_sq;  // adamw
  GainState row, col, scalar;               // sizes m, n, 1 when the rule has them
  std::vector<double> radius;               // one per sphere slice
};

// Norm of every sphere slice of an m x n matrix (1, m or n values; none for kNone).
std::vector<double> SliceNorms(Sphere sphere, int64_t m, int64_t n, const double* w);

// Sets up state for initial weights w0: gains at 1, moments at 0, radii from the rule
// (per-slice norms of w0 for radius=init), and projects W onto its sphere when `project`;
// otherwise (preserve_init) W stays w0 and the gains take each slice's ||W_k|| / R_k
// (PreserveInitTarget).
// Returns the index of a slice whose norm is zero or non-finite (it cannot be projected),
// or -1 when every slice is fine.
int64_t Init(const UpdateRule& rule, int64_t m, int64_t n, const double* w0, bool project,
             MatrixState* s);

// Scales each slice of d (m x n) to its radius. radius has SphereSlices() entries.
void Project(Sphere sphere, const double* radius, int64_t m, int64_t n, double* d);

// O = NS_steps(X) for m x n X: normalise by ||X||_F + 1e-7, iterate on the wide
// orientation (transposed when m > n), return in X's orientation.
void NewtonSchulz(NsCoeffSet set, int steps, int64_t m, int64_t n, const double* x,
                  double* out);

// Gradients with respect to the column gains (n) and the scalar gain (1) for gradient g at
// state s (step 2 of the math), zeros where the rule has no such gain.
struct ColScalarGrads {
  std::vector<double> col;
  double scalar = 0.0;
};
ColScalarGrads ColScalarGradients(const UpdateRule& rule, const double* g, const MatrixState& s);

// One step with gradient g (m x n). lr and gain_lr already include the lr schedule's scale;
// t is the 1-based count of steps taken, for Adam's bias correction. `shared`, when given,
// replaces the matrix's own column- and scalar-gain gradients: a matrix of row blocks
// (blocks=rows:K) steps each block with the sum of ColScalarGradients over its K blocks.
void Step(const UpdateRule& rule, const double* g, double lr, double gain_lr, int64_t t,
          MatrixState* s, const ColScalarGrads* shared = nullptr);

// The effective gains gamma = phi(raw), or ones where the rule has no such gain.
std::vector<double> RowGains(const UpdateRule& rule, const MatrixState& s);
std::vector<double> ColGains(const UpdateRule& rule, const MatrixState& s);
double ScalarGain(const UpdateRule& rule, const MatrixState& s);

}  // namespace mdopt::kernels::ref

#endif  // MDOPT_KERNELS_REFERENCE_REFERENCE_H_
