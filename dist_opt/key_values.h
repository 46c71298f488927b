// The one tokeniser of "key=value key=value ..." text: group specs (group_spec.h) and
// optimizer options (options.h) both read their text through it, so both refuse the same
// malformed input with the same words.
#ifndef MDOPT_DIST_OPT_KEY_VALUES_H_
#define MDOPT_DIST_OPT_KEY_VALUES_H_

#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mdopt {

// A view into the text given to SplitKeyValues.
struct KeyValue {
  absl::string_view key;
  absl::string_view value;
};

// Splits text at spaces, tabs, newlines and carriage returns (runs of them, and at either
// end, count as one) into key=value tokens, in order. The key ends at the first '='; the
// value is the rest of the token. InvalidArgument, with `what` ("spec", "option") first:
//   "<what>: '<token>' is not of the form key=value (no '=' | empty key | empty value)"
//   "<what> key '<key>' is given twice"
// Empty text gives no pairs.
absl::StatusOr<std::vector<KeyValue>> SplitKeyValues(absl::string_view text,
                                                     absl::string_view what);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_KEY_VALUES_H_
