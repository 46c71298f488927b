// The tensors registered with an optimizer: names, groups, shapes, dtypes and the model's
// buffers, validated once here so that the engines can trust them.
#ifndef MDOPT_DIST_OPT_PARAM_REGISTRY_H_
#define MDOPT_DIST_OPT_PARAM_REGISTRY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "dist_opt/group_spec.h"
#include "kernels/common/dtype.h"
#include "kernels/common/row_map.h"
#include "kernels/common/update_rule.h"

namespace mdopt {

using kernels::Dtype;

struct Group {
  std::string name;
  GroupSpec spec;  // spec.rule.lr and gain_lr are the current values (mdopt_set_group_lr)
  // lr and gain_lr as the spec gave them: mdopt_set_group_lr scales gain_lr by lr / spec_lr.
  double spec_lr = 0.0, spec_gain_lr = 0.0;
};

// What a caller describes (the C ABI's mdopt_param_desc, with owned strings).
struct ParamDescription {
  std::string name;
  std::string group;
  int ndim = 0;
  int64_t shape[3] = {0, 0, 0};
  int param_dtype = 0;  // mdopt_dtype values; checked here
  void* param = nullptr;
  int grad_dtype = 0;
  const void* grad = nullptr;
  double radius_scale = 0.0;  // 0: 1; else finite > 0, and the parameter has a sphere
};

struct ParamEntry {
  std::string name;
  int group = 0;
  int ndim = 0;
  int64_t shape[3] = {0, 0, 0};
  Dtype param_dtype = Dtype::kF32;
  Dtype grad_dtype = Dtype::kF32;
  void* param = nullptr;
  const void* grad = nullptr;
  // As matrices (slots): `experts` matrices of n columns (1-D: one 1 x len matrix). A matrix
  // of K logical row blocks (spec key blocks=) counts as K matrices here: `experts` is the
  // stack's experts times K, and slot s is block s % K of matrix s / K. matrix_m: the rows of
  // one matrix of the stack (every block together); block_m[j], block_row0[j]: block j's
  // rows and its first row in block order (kernels/common/row_map.h: for blocks=groups:G the
  // blocks' rows interleave in the tensor, row_map says where).
  int64_t experts = 1, n = 1;
  int64_t matrix_m = 1;
  int64_t blocks = 1;
  std::vector<int64_t> block_m{1}, block_row0{0};
  kernels::RowMap row_map;
  // The group's rule made to fit the tensor (1-D: no sphere, no gains).
  kernels::UpdateRule rule;
  bool preserve_init = false;

  // Rows of slot `s`, and its first row in the tensor in block order.
  int64_t SlotM(int64_t s) const { return block_m[static_cast<size_t>(s % blocks)]; }
  int64_t SlotRow0(int64_t s) const {
    return (s / blocks) * matrix_m + block_row0[static_cast<size_t>(s % blocks)];
  }
  int64_t numel() const { return (experts / blocks) * matrix_m * n; }
  // " of expert E", " of block B", " of expert E block B" or "" for matrix `slot` (of
  // `experts`), for messages.
  std::string SlotWhere(int64_t slot) const;
  size_t param_elem_bytes() const { return param_dtype == Dtype::kF32 ? 4 : 2; }
  size_t grad_elem_bytes() const { return grad_dtype == Dtype::kF32 ? 4 : 2; }
};

class ParamRegistry {
 public:
  // Validates d against the groups and appends it; returns its index.
  absl::StatusOr<int64_t> Add(const ParamDescription& d, const std::vector<Group>& groups);
  absl::Status SetPointers(int64_t index, void* param, const void* grad);
  absl::StatusOr<int64_t> Find(const std::string& name) const;
  // Sets lr and gain_lr of every param of `group` (their rules are copies of the group's).
  void SetGroupLr(int group, double lr, double gain_lr);
  // Sets beta1, beta2, eps, momentum and weight_decay of every param of `group` to `rule`'s.
  void SetGroupScalars(int group, const kernels::UpdateRule& rule);
  const std::vector<ParamEntry>& params() const { return params_; }
  int64_t size() const { return static_cast<int64_t>(params_.size()); }

 private:
  std::vector<ParamEntry> params_;
  absl::flat_hash_map<std::string, int64_t> by_name_;
};

// Names of params and groups: 1..256 printable characters, no whitespace (they go into
// checkpoint manifests as single tokens).
absl::Status ValidateName(const char* what, const std::string& name);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_PARAM_REGISTRY_H_
