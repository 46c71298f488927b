#include "dist_opt/key_values.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace mdopt {

absl::StatusOr<std::vector<KeyValue>> SplitKeyValues(absl::string_view text,
                                                     absl::string_view what) {
  std::vector<KeyValue> pairs;
  for (absl::string_view tok : absl::StrSplit(text, absl::ByAnyChar(" \t\n\r"), absl::SkipEmpty())) {
    const size_t eq = tok.find('=');
    const char* why = eq == absl::string_view::npos ? "no '='"
                      : eq == 0                     ? "empty key"
                      : eq + 1 == tok.size()        ? "empty value"
                                                    : nullptr;
    if (why != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": '", tok, "' is not of the form key=value (", why, ")"));
    }
    const KeyValue kv{tok.substr(0, eq), tok.substr(eq + 1)};
    // Specs and options have a handful of keys: a linear search beats a set.
    for (const KeyValue& seen : pairs) {
      if (seen.key == kv.key) {
        return absl::InvalidArgumentError(absl::StrCat(what, " key '", kv.key, "' is given twice"));
      }
    }
    pairs.push_back(kv);
  }
  return pairs;
}

}  // namespace mdopt
