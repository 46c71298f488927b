#include "tensor_data.h"

#include <algorithm>
#include <cmath>

#include "kernels/common/bf16.h"

namespace mdopt_bench {
namespace {

using mdopt::kernels::FloatToBf16;

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// xoshiro256** with Box-Muller on top. std::normal_distribution is not specified bit for
// bit, so the same --seed would give other numbers with another standard library; this
// generator gives the same tensors everywhere.
class NormalGenerator {
 public:
  explicit NormalGenerator(uint64_t seed) {
    for (uint64_t& w : s_) w = SplitMix64(&seed);
  }

  void Fill(float* out, int64_t n, float stddev) {
    int64_t k = 0;
    for (; k + 1 < n; k += 2) {
      float a, b;
      Pair(&a, &b);
      out[k] = stddev * a;
      out[k + 1] = stddev * b;
    }
    if (k < n) {
      float a, b;
      Pair(&a, &b);
      out[k] = stddev * a;
    }
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }

  // A uniform in (0, 1]: never 0, so the log below is finite.
  double Uniform() { return (static_cast<double>(Next() >> 11) + 1.0) * 0x1.0p-53; }

  void Pair(float* a, float* b) {
    const double r = std::sqrt(-2.0 * std::log(Uniform()));
    const double theta = 6.283185307179586 * Uniform();
    *a = static_cast<float>(r * std::cos(theta));
    *b = static_cast<float>(r * std::sin(theta));
  }

  uint64_t s_[4];
};

// One independent stream per (seed, purpose, step, tensor): a tensor's numbers do not
// depend on which other tensors exist or on the order they are filled in.
uint64_t StreamSeed(uint64_t seed, uint64_t purpose, uint64_t step, uint64_t tensor) {
  uint64_t s = seed;
  uint64_t h = SplitMix64(&s);
  for (uint64_t v : {purpose, step, tensor}) {
    s = h ^ v;
    h = SplitMix64(&s);
  }
  return h;
}

constexpr uint64_t kWeights = 1, kGradients = 2;

}  // namespace

ModelBuffers::Buffer::Buffer(int64_t numel, mdopt_dtype dtype) {
  if (dtype == MDOPT_DTYPE_BF16) {
    bf16_.assign(static_cast<size_t>(numel), 0);
  } else {
    f32_.assign(static_cast<size_t>(numel), 0.0f);
  }
}

void ModelBuffers::Buffer::Store(const std::vector<float>& values) {
  if (!f32_.empty()) {
    std::copy(values.begin(), values.end(), f32_.begin());
    return;
  }
  for (size_t k = 0; k < values.size(); ++k) bf16_[k] = FloatToBf16(values[k]);
}

ModelBuffers::ModelBuffers(const std::vector<TensorShape>& shapes, mdopt_dtype param_dtype,
                           mdopt_dtype grad_dtype)
    : shapes_(shapes), param_dtype_(param_dtype), grad_dtype_(grad_dtype) {
  for (const TensorShape& s : shapes) {
    params_.emplace_back(s.numel(), param_dtype);
    grads_.emplace_back(s.numel(), grad_dtype);
  }
}

void ModelBuffers::ResetWeights(uint64_t seed) {
  for (size_t i = 0; i < shapes_.size(); ++i) {
    const TensorShape& s = shapes_[i];
    scratch_.resize(static_cast<size_t>(s.numel()));
    if (s.kind == TensorKind::kVector) {
      std::fill(scratch_.begin(), scratch_.end(), 1.0f);
    } else {
      NormalGenerator gen(StreamSeed(seed, kWeights, 0, i));
      gen.Fill(scratch_.data(), s.numel(), static_cast<float>(1.0 / std::sqrt(double(s.d_in()))));
    }
    params_[i].Store(scratch_);
  }
}

void ModelBuffers::FillGradients(uint64_t seed, int64_t step) {
  for (size_t i = 0; i < shapes_.size(); ++i) {
    const TensorShape& s = shapes_[i];
    scratch_.resize(static_cast<size_t>(s.numel()));
    NormalGenerator gen(StreamSeed(seed, kGradients, static_cast<uint64_t>(step), i));
    gen.Fill(scratch_.data(), s.numel(), 1.0f);
    grads_[i].Store(scratch_);
  }
}

}  // namespace mdopt_bench
