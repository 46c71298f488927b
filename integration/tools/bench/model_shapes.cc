#include "model_shapes.h"

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

namespace mdopt_bench {
namespace {

struct KindEntry {
  TensorKind kind;
  const char* name;
  int dims;
};

constexpr KindEntry kKinds[] = {{TensorKind::kMatrix, "matrix", 2},
                                {TensorKind::kEmbedding, "embedding", 2},
                                {TensorKind::kHead, "head", 2},
                                {TensorKind::kVector, "vector", 1},
                                {TensorKind::kExperts, "experts", 3}};

// The library takes sides below 2^31 (a BLAS int); refusing larger ones here gives the
// user a message that names the file line instead of an ABI error.
constexpr int64_t kMaxSide = (int64_t{1} << 31) - 1;
// The library's limit on one tensor; checked here also so that numel() cannot overflow.
constexpr int64_t kMaxNumel = int64_t{1} << 40;

bool ParseDim(const std::string& token, int64_t* out) {
  if (token.empty() || token[0] == '-' || token[0] == '+') return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(token.c_str(), &end, 10);
  if (errno != 0 || end == token.c_str() || *end != '\0' || v < 1 || v > kMaxSide) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

}  // namespace

const char* KindName(TensorKind kind) {
  for (const KindEntry& e : kKinds)
    if (e.kind == kind) return e.name;
  return "?";
}

bool KindFromName(const std::string& name, TensorKind* kind) {
  for (const KindEntry& e : kKinds) {
    if (name == e.name) {
      *kind = e.kind;
      return true;
    }
  }
  return false;
}

int KindDims(TensorKind kind) {
  for (const KindEntry& e : kKinds)
    if (e.kind == kind) return e.dims;
  return 0;
}

int64_t TensorShape::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

int64_t TotalNumel(const std::vector<TensorShape>& shapes) {
  int64_t n = 0;
  for (const TensorShape& s : shapes) n += s.numel();
  return n;
}

std::vector<TensorShape> GptShapes(const GptSizes& z) {
  const int64_t d = z.d_model, f = z.ffn_mult * z.d_model;
  std::vector<TensorShape> out;
  out.push_back({"tok_emb", TensorKind::kEmbedding, {z.vocab, d}});
  for (int64_t l = 0; l < z.layers; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    out.push_back({p + "norm1", TensorKind::kVector, {d}});
    for (const char* m : {"q", "k", "v", "o"}) out.push_back({p + m, TensorKind::kMatrix, {d, d}});
    out.push_back({p + "norm2", TensorKind::kVector, {d}});
    out.push_back({p + "fc1", TensorKind::kMatrix, {f, d}});
    out.push_back({p + "fc2", TensorKind::kMatrix, {d, f}});
  }
  out.push_back({"final_norm", TensorKind::kVector, {d}});
  out.push_back({"lm_head", TensorKind::kHead, {z.vocab, d}});
  return out;
}

bool ReadShapesFile(const std::string& path, std::vector<TensorShape>* shapes,
                    std::string* error) {
  std::ifstream in(path);
  if (!in) {
    *error = path + ": cannot be opened";
    return false;
  }
  std::vector<TensorShape> out;
  std::set<std::string> names;
  std::string line;
  int line_no = 0;
  auto fail = [&](const std::string& what) {
    *error = path + ":" + std::to_string(line_no) + ": " + what;
    return false;
  };
  while (std::getline(in, line)) {
    ++line_no;
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream tokens(line);
    std::vector<std::string> t;
    for (std::string s; tokens >> s;) t.push_back(s);
    if (t.empty()) continue;
    if (t.size() < 2) return fail("expected 'name kind dims...', got only '" + t[0] + "'");
    TensorShape s;
    s.name = t[0];
    if (!KindFromName(t[1], &s.kind)) {
      return fail("kind '" + t[1] + "' is not one of matrix, embedding, head, vector, experts");
    }
    const int want = KindDims(s.kind);
    if (static_cast<int>(t.size()) - 2 != want) {
      return fail("kind '" + t[1] + "' takes " + std::to_string(want) + " dims, got " +
                  std::to_string(t.size() - 2));
    }
    int64_t numel = 1;
    for (size_t k = 2; k < t.size(); ++k) {
      int64_t v;
      if (!ParseDim(t[k], &v)) return fail("dim '" + t[k] + "' is not an integer in [1, 2^31)");
      if (numel > kMaxNumel / v) return fail("tensor '" + s.name + "' has more than 2^40 elements");
      numel *= v;
      s.dims.push_back(v);
    }
    if (!names.insert(s.name).second) return fail("tensor '" + s.name + "' is listed twice");
    out.push_back(std::move(s));
  }
  if (in.bad()) return fail("read error");
  if (out.empty()) {
    *error = path + ": holds no tensors";
    return false;
  }
  *shapes = std::move(out);
  return true;
}

const char* ShapesFileFormatHelp() {
  return "Shapes file (--shapes FILE): one tensor per line, 'name kind dims...';\n"
         "'#' starts a comment, blank lines are skipped, names are unique.\n"
         "  name matrix     d_out d_in       a weight matrix (the preset's group)\n"
         "  name experts    E d_out d_in     E stacked expert matrices (the preset's group)\n"
         "  name embedding  vocab d          token embedding\n"
         "  name head       vocab d          LM head\n"
         "  name vector     n                norm gain or bias\n"
         "Example:\n"
         "  tok_emb   embedding 8192 256\n"
         "  blk0.qkv  matrix    768 256\n"
         "  blk0.moe  experts   8 1024 256\n"
         "  blk0.ln   vector    256\n"
         "  lm_head   head      8192 256\n";
}

}  // namespace mdopt_bench
