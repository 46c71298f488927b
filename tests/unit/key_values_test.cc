// SplitKeyValues (dist_opt/key_values.h), the tokeniser of group specs and optimizer
// options: pairs in order with their exact text, every kind of separator, and each refusal
// with its message naming the token or key at fault.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "dist_opt/key_values.h"

namespace mdopt {
namespace {

std::vector<std::pair<std::string, std::string>> Pairs(absl::string_view text) {
  absl::StatusOr<std::vector<KeyValue>> kv = SplitKeyValues(text, "spec");
  EXPECT_TRUE(kv.ok()) << kv.status();
  std::vector<std::pair<std::string, std::string>> out;
  if (kv.ok())
    for (const KeyValue& p : *kv) out.emplace_back(p.key, p.value);
  return out;
}

using P = std::vector<std::pair<std::string, std::string>>;

TEST(KeyValues, SplitsInOrderAtAnyWhitespace) {
  EXPECT_EQ(Pairs(""), P{});
  EXPECT_EQ(Pairs(" \t\r\n "), P{});
  EXPECT_EQ(Pairs("a=1"), (P{{"a", "1"}}));
  EXPECT_EQ(Pairs("  lr=0.1\tpreset=md-muon\nb=x\r\nc=y  "),
            (P{{"lr", "0.1"}, {"preset", "md-muon"}, {"b", "x"}, {"c", "y"}}));
  // The key ends at the first '='; the rest, '=' included, is the value (which the caller
  // then refuses or accepts).
  EXPECT_EQ(Pairs("device=cuda:0 x=a=b"), (P{{"device", "cuda:0"}, {"x", "a=b"}}));
  // Keys are compared exactly: case matters.
  EXPECT_EQ(Pairs("LR=1 lr=2"), (P{{"LR", "1"}, {"lr", "2"}}));
}

TEST(KeyValues, ViewsPointIntoTheText) {
  const std::string text = "k=v";
  absl::StatusOr<std::vector<KeyValue>> kv = SplitKeyValues(text, "option");
  ASSERT_TRUE(kv.ok()) << kv.status();
  ASSERT_EQ(kv->size(), 1u);
  EXPECT_EQ((*kv)[0].key.data(), text.data());
  EXPECT_EQ((*kv)[0].value.data(), text.data() + 2);
}

TEST(KeyValues, RefusesMalformedTokensNamingThem) {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"lr", "spec: 'lr' is not of the form key=value (no '=')"},
      {"a=1 lr b=2", "spec: 'lr' is not of the form key=value (no '=')"},
      {"=1", "spec: '=1' is not of the form key=value (empty key)"},
      {"=", "spec: '=' is not of the form key=value (empty key)"},
      {"==", "spec: '==' is not of the form key=value (empty key)"},
      {"a=1 lr=", "spec: 'lr=' is not of the form key=value (empty value)"},
      {"lr=1 lr=2", "spec key 'lr' is given twice"},
      {"lr=1 a=2 lr=1", "spec key 'lr' is given twice"},
      // The first fault in the text is the one reported.
      {"a=1 a=2 b", "spec key 'a' is given twice"},
      {"b a=1 a=2", "spec: 'b' is not of the form key=value (no '=')"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    absl::StatusOr<std::vector<KeyValue>> kv = SplitKeyValues(c.text, "spec");
    ASSERT_FALSE(kv.ok());
    EXPECT_EQ(kv.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(kv.status().message(), c.message);
  }
  // `what` starts every message.
  EXPECT_EQ(SplitKeyValues("threads=1 threads=2", "option").status().message(),
            "option key 'threads' is given twice");
  EXPECT_EQ(SplitKeyValues("threads", "option").status().message(),
            "option: 'threads' is not of the form key=value (no '=')");
}

}  // namespace
}  // namespace mdopt
