#include "comm/op_state.h"

#include "absl/strings/str_cat.h"
#include "comm/arg_checks.h"

namespace mdopt {

std::string OpLabel::Format() const {
  switch (detail) {
    case Detail::kNone:
      return "";
    case Detail::kElements: {
      std::string s = absl::StrCat(" (", count, " x ", DataTypeName(dtype));
      if (reduces) absl::StrAppend(&s, ", ", ReduceOpName(reduce));
      absl::StrAppend(&s, ")");
      if (root >= 0) absl::StrAppend(&s, " from root ", root);
      return s;
    }
    case Detail::kGroup:
      return absl::StrCat(" (", count, " ops, tag ", tag, ")");
  }
  return "";
}

}  // namespace mdopt
