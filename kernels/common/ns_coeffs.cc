#include "kernels/common/ns_coeffs.h"

#include <algorithm>
#include <array>

namespace mdopt::kernels {
namespace {

// The per-step quintic set of modded-nanogpt, Dion and Emerging-Optimizers (the authors'
// Newton-Schulz); the latter cycles the whole set for more than five iterations.
constexpr std::array<NsTuple, 5> kQuintic = {{{4.0848, -6.8946, 2.9270},
                                              {3.9505, -6.3029, 2.6377},
                                              {3.7418, -5.5913, 2.3037},
                                              {2.8769, -3.1427, 1.2046},
                                              {2.8366, -3.0525, 1.2012}}};

// Keller Jordan's single tuple, used every step (torch.optim.Muon's default).
constexpr NsTuple kJordan = {3.4445, -4.7750, 2.0315};

// Polar Express (Amsel, Persson, Musco, Gower 2025, Algorithm 1, degree 5): the eight
// published tuples; the first seven are divided by (1.01, 1.01^3, 1.01^5) as the paper
// does for numerical safety, the last is the fixed point and is kept as is.
constexpr std::array<NsTuple, 8> kPolarExpressRaw = {{
    {8.28721201814563, -23.595886519098837, 17.300387312530933},
    {4.107059111542203, -2.9478499167379106, 0.5448431082926601},
    {3.9486908534822946, -2.908902115962949, 0.5518191394370137},
    {3.3184196573706015, -2.488488024314874, 0.51004894012372},
    {2.300652019954817, -1.6689039845747493, 0.4188073119525673},
    {1.891301407787398, -1.2679958271945868, 0.37680408948524835},
    {1.8750014808534479, -1.2500016453999487, 0.3750001645474248},
    {1.875, -1.25, 0.375},
}};
constexpr double kPolarExpressSafety = 1.01;

}  // namespace

NsTuple NsCoefficients(NsCoeffSet set, int k) {
  switch (set) {
    case NsCoeffSet::kQuintic:
      static_assert(kQuintic.size() == kQuinticSetSize);
      return kQuintic[static_cast<size_t>(k) % kQuintic.size()];
    case NsCoeffSet::kQuinticHold:
      return kQuintic[std::min<size_t>(static_cast<size_t>(k), kQuintic.size() - 1)];
    case NsCoeffSet::kJordan:
      return kJordan;
    case NsCoeffSet::kPolarExpress: {
      const size_t last = kPolarExpressRaw.size() - 1;
      const size_t i = std::min<size_t>(static_cast<size_t>(k), last);
      NsTuple t = kPolarExpressRaw[i];
      if (i != last) {
        const double s = kPolarExpressSafety;
        t = {t.a / s, t.b / (s * s * s), t.c / (s * s * s * s * s)};
      }
      return t;
    }
  }
  return kJordan;
}

}  // namespace mdopt::kernels
