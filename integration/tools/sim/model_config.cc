#include "model_config.h"

namespace mdopt_sim {

bool ConfigShapes(const ModelConfig& c, std::vector<mdopt_bench::TensorShape>* shapes,
                  std::string* error) {
  using mdopt_bench::TensorKind;
  for (auto [name, v] : {std::pair<const char*, int64_t>{"layers", c.layers}, {"d-model", c.d_model},
                         {"heads", c.heads}, {"kv-groups", c.kv_groups}, {"ffn", c.ffn},
                         {"experts", c.experts}, {"vocab", c.vocab}}) {
    if (v < 1) {
      *error = std::string("--") + name + " must be >= 1, got " + std::to_string(v);
      return false;
    }
  }
  if (c.d_model % c.heads != 0 || c.heads % c.kv_groups != 0) {
    *error = "--heads must divide --d-model and --kv-groups must divide --heads";
    return false;
  }
  const int64_t d = c.d_model, kv = c.kv_groups * (d / c.heads);
  auto add = [&](std::string name, TensorKind kind, std::vector<int64_t> dims) {
    shapes->push_back({std::move(name), kind, std::move(dims)});
  };
  add("embedding", TensorKind::kEmbedding, {c.vocab, d});
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    add(p + "norm1", TensorKind::kVector, {d});
    add(p + "q", TensorKind::kMatrix, {d, d});
    add(p + "k", TensorKind::kMatrix, {kv, d});
    add(p + "v", TensorKind::kMatrix, {kv, d});
    add(p + "o", TensorKind::kMatrix, {d, d});
    add(p + "norm2", TensorKind::kVector, {d});
    if (c.experts > 1) {
      add(p + "router", TensorKind::kMatrix, {c.experts, d});
      add(p + "experts.gate", TensorKind::kExperts, {c.experts, c.ffn, d});
      add(p + "experts.up", TensorKind::kExperts, {c.experts, c.ffn, d});
      add(p + "experts.down", TensorKind::kExperts, {c.experts, d, c.ffn});
    } else {
      add(p + "gate", TensorKind::kMatrix, {c.ffn, d});
      add(p + "up", TensorKind::kMatrix, {c.ffn, d});
      add(p + "down", TensorKind::kMatrix, {d, c.ffn});
    }
  }
  add("final_norm", TensorKind::kVector, {d});
  add("lm_head", TensorKind::kHead, {c.vocab, d});
  return true;
}

}  // namespace mdopt_sim
