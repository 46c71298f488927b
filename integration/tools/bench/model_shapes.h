// The tensors mdopt-bench registers: a GPT-shaped set built from a few sizes, or one read
// from a shapes file. Only shapes and kinds live here; buffers are in tensor_data.h.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_MODEL_SHAPES_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_MODEL_SHAPES_H_

#include <cstdint>
#include <string>
#include <vector>

namespace mdopt_bench {

// What a tensor is in the model; the preset table (preset_groups.h) maps it to a group.
enum class TensorKind { kMatrix, kEmbedding, kHead, kVector, kExperts };

const char* KindName(TensorKind kind);
// False when `name` is not one of matrix, embedding, head, vector, experts.
bool KindFromName(const std::string& name, TensorKind* kind);
// How many dims a kind takes: 2, 2, 2, 1 and 3 (experts: E d_out d_in).
int KindDims(TensorKind kind);

struct TensorShape {
  std::string name;
  TensorKind kind = TensorKind::kMatrix;
  std::vector<int64_t> dims;  // row-major; a matrix is d_out x d_in

  int64_t numel() const;
  // The fan-in of one row: the last dim (the init is N(0, 1/d_in)).
  int64_t d_in() const { return dims.back(); }
};

struct GptSizes {
  int64_t d_model = 256;
  int64_t layers = 2;
  int64_t vocab = 8192;
  int64_t ffn_mult = 4;
};

// Token embedding, per layer q, k, v, o (d x d), fc1 (ffn*d x d), fc2 (d x ffn*d) and two
// RMSNorm gains (d), then the final norm (d) and the LM head (vocab x d).
std::vector<TensorShape> GptShapes(const GptSizes& sizes);

// Reads a shapes file (format in ShapesFileFormatHelp()). On error returns false and sets
// *error to "FILE:LINE: what is wrong".
bool ReadShapesFile(const std::string& path, std::vector<TensorShape>* shapes,
                    std::string* error);

// The format of a shapes file, for --help.
const char* ShapesFileFormatHelp();

int64_t TotalNumel(const std::vector<TensorShape>& shapes);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_MODEL_SHAPES_H_
