// The shard plan through the C ABI on one rank: mdopt_describe_plan (text for people) and
// mdopt_plan_json (for programs): the buffer rules (size query, truncation, NUL), refusal
// before finalize and of NULL arguments, and the JSON's slots against the registered
// tensors (one slot per matrix, per expert of a 3-D stack, a 1-D tensor as 1 x n) and the
// group's base optimizer (Muon or not). The multi-rank plan is checked under mpirun
// (tests/dist/c_abi_sharded.c).
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::TensorSpec;

std::string Fetch(mdopt_status (*call)(const mdopt_optimizer*, char*, size_t, size_t*),
                  const mdopt_optimizer* opt) {
  size_t needed = 0;
  EXPECT_EQ(call(opt, nullptr, 0, &needed), MDOPT_SUCCESS) << mdopt_last_error();
  EXPECT_GT(needed, 1u);
  std::string text(needed, 'x');
  EXPECT_EQ(call(opt, text.data(), text.size(), nullptr), MDOPT_SUCCESS) << mdopt_last_error();
  EXPECT_EQ(text.back(), '\0');
  text.pop_back();
  EXPECT_EQ(text.size(), std::strlen(text.c_str()));
  return text;
}

const std::vector<TensorSpec> kTensors = {{"a", {7, 19}}, {"experts", {3, 5, 8}}, {"vec", {13}}};

TEST(PlanAbi, JsonListsEverySlot) {
  for (const char* spec : {"preset=md-muon", "preset=md-adamw"}) {
    SCOPED_TRACE(spec);
    const bool muon = std::string(spec) == "preset=md-muon";
    std::vector<TensorSpec> t = kTensors;
    if (muon) t.pop_back();  // Muon groups take matrices only
    AbiHarness h("threads=1", spec, t, 1);
    MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
    const nlohmann::json plan = nlohmann::json::parse(Fetch(mdopt_plan_json, h.opt()));
    EXPECT_EQ(plan.at("world").get<int>(), 1);
    // Expected slots from the tensors: (param, expert, m, n).
    struct Want { int64_t param, expert, m, n; };
    std::vector<Want> want = {{0, 0, 7, 19}, {1, 0, 5, 8}, {1, 1, 5, 8}, {1, 2, 5, 8}};
    if (!muon) want.push_back({2, 0, 1, 13});
    const nlohmann::json& slots = plan.at("slots");
    ASSERT_EQ(slots.size(), want.size());
    for (size_t k = 0; k < want.size(); ++k) {
      const nlohmann::json& s = slots[k];
      EXPECT_EQ(s.at("param").get<int64_t>(), want[k].param);
      EXPECT_EQ(s.at("expert").get<int64_t>(), want[k].expert);
      EXPECT_EQ(s.at("m").get<int64_t>(), want[k].m);
      EXPECT_EQ(s.at("n").get<int64_t>(), want[k].n);
      EXPECT_EQ(s.at("muon").get<bool>(), muon);
      EXPECT_EQ(s.at("owner").get<int>(), 0);  // one rank holds everything
      EXPECT_EQ(s.at("block_rows").get<int64_t>(), want[k].m);
      const std::string layout = s.at("layout").get<std::string>();
      EXPECT_TRUE(layout == "rows" || layout == "owner") << layout;
      EXPECT_GE(s.at("bucket").get<int>(), 0);
    }
  }
}

TEST(PlanAbi, TextNamesEveryMatrixAndBufferRulesHold) {
  AbiHarness h("threads=1", "preset=md-adamw", kTensors, 2);
  char small[8];
  EXPECT_EQ(mdopt_describe_plan(h.opt(), small, sizeof small, nullptr), MDOPT_INVALID_STATE);
  EXPECT_NE(std::string(mdopt_last_error()).find("before mdopt_finalize"), std::string::npos);
  EXPECT_EQ(mdopt_plan_json(h.opt(), small, sizeof small, nullptr), MDOPT_INVALID_STATE);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));

  const std::string text = Fetch(mdopt_describe_plan, h.opt());
  for (const char* name : {"a", "experts[0]", "experts[2]", "vec", "bucket 0"}) {
    EXPECT_NE(text.find(name), std::string::npos) << name << " in\n" << text;
  }
  // Truncation: at most size - 1 characters, always NUL-terminated, *needed the whole size.
  const std::string json = Fetch(mdopt_plan_json, h.opt());
  size_t needed = 0;
  std::memset(small, 'x', sizeof small);
  EXPECT_EQ(mdopt_plan_json(h.opt(), small, 5, &needed), MDOPT_SUCCESS);
  EXPECT_EQ(needed, json.size() + 1);
  EXPECT_EQ(std::string(small), json.substr(0, 4));
  EXPECT_EQ(small[5], 'x');  // nothing written past `size`

  EXPECT_EQ(mdopt_plan_json(nullptr, small, sizeof small, nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("opt is NULL"), std::string::npos);
  EXPECT_EQ(mdopt_plan_json(h.opt(), nullptr, 4, nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("buf is NULL"), std::string::npos);
  EXPECT_EQ(mdopt_describe_plan(h.opt(), nullptr, 4, nullptr), MDOPT_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace mdopt
