// A GPT or MoE model from its sizes, as tensors in mdopt-bench's shapes (model_shapes.h), for
// mdopt-sim's --layers/--d-model/... options: the same tensors the shapes files list.
#ifndef MDOPT_INTEGRATION_TOOLS_SIM_MODEL_CONFIG_H_
#define MDOPT_INTEGRATION_TOOLS_SIM_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "../bench/model_shapes.h"

namespace mdopt_sim {

struct ModelConfig {
  int64_t layers = 0, d_model = 0, heads = 0, kv_groups = 0, ffn = 0, experts = 0, vocab = 0;
};

// Embedding (vocab x d), per layer: two norm gains, q (d x d), k and v (kv_groups * head_dim
// x d), o (d x d), then a SwiGLU MLP: dense gate, up (ffn x d) and down (d x ffn), or with
// experts > 1 a router (experts x d) and three expert stacks (experts x ffn x d, experts x d x
// ffn); the final norm and an untied head (vocab x d). False with *error on a size < 1, heads
// not dividing d_model or kv_groups not dividing heads.
bool ConfigShapes(const ModelConfig& c, std::vector<mdopt_bench::TensorShape>* shapes,
                  std::string* error);

}  // namespace mdopt_sim

#endif  // MDOPT_INTEGRATION_TOOLS_SIM_MODEL_CONFIG_H_
