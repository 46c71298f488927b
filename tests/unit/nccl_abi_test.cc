// mdopt_comm_nccl_unique_id and mdopt_comm_create_nccl through the C ABI, in every build:
// null arguments are refused first; a build without CUDA/NCCL answers MDOPT_UNSUPPORTED with
// a message that says so; a build with them but no usable GPU is skipped (the NCCL
// communicator itself is tested on a GPU, tests/cuda/nccl_comm_test).
#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "comm/communicator.h"
#include "mdopt/mdopt.h"

namespace mdopt {
namespace {

TEST(NcclAbi, NullArgumentsAreRefusedInEveryBuild) {
  char id[MDOPT_NCCL_UNIQUE_ID_BYTES] = {};
  mdopt_comm* comm = nullptr;
  EXPECT_EQ(mdopt_comm_nccl_unique_id(nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("id"), std::string::npos) << mdopt_last_error();
  EXPECT_EQ(mdopt_comm_create_nccl(id, 1, 0, 0, nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_comm_create_nccl(nullptr, 1, 0, 0, &comm), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(comm, nullptr);
}

TEST(NcclAbi, UnsupportedWithoutNccl) {
  if (NcclBackendBuilt()) GTEST_SKIP() << "this build has the NCCL backend";
  char id[MDOPT_NCCL_UNIQUE_ID_BYTES] = {};
  EXPECT_EQ(mdopt_comm_nccl_unique_id(id), MDOPT_UNSUPPORTED);
  EXPECT_NE(std::string(mdopt_last_error()).find("no NCCL backend"), std::string::npos)
      << mdopt_last_error();
  mdopt_comm* comm = nullptr;
  EXPECT_EQ(mdopt_comm_create_nccl(id, 1, 0, 0, &comm), MDOPT_UNSUPPORTED);
  EXPECT_NE(std::string(mdopt_last_error()).find("no NCCL backend"), std::string::npos)
      << mdopt_last_error();
  EXPECT_EQ(comm, nullptr);
}

// The typed id and creation with a timeout (ABI 1, minor 3): every argument is checked in
// every build, before MDOPT_UNSUPPORTED in one without NCCL.
TEST(NcclAbi, TypedIdAndTimeoutArgumentsAreCheckedInEveryBuild) {
  static_assert(sizeof(mdopt_nccl_id) == MDOPT_NCCL_UNIQUE_ID_BYTES, "a frozen 128-byte id");
  mdopt_nccl_id id = {};
  mdopt_comm* comm = nullptr;
  struct Case {
    const mdopt_nccl_id* id;
    int size, rank, device;
    double timeout_s;
    bool out;
    const char* needle;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const Case cases[] = {
      {&id, 1, 0, 0, 10.0, false, "out is NULL"},
      {nullptr, 1, 0, 0, 10.0, true, "id is NULL"},
      {&id, 0, 0, 0, 10.0, true, "size = 0"},
      {&id, -4, 0, 0, 10.0, true, "size = -4"},
      {&id, 2, 2, 0, 10.0, true, "rank = 2 is outside [0, 2)"},
      {&id, 2, -1, 0, 10.0, true, "rank = -1"},
      {&id, 1, 0, -1, 10.0, true, "device = -1"},
      {&id, 1, 0, 0, 0.0, true, "timeout_s = 0"},
      {&id, 1, 0, 0, -5.0, true, "timeout_s = -5"},
      {&id, 1, 0, 0, nan, true, "timeout_s = nan"},
      {&id, 1, 0, 0, inf, true, "timeout_s = inf"},
      {&id, 1, 0, 0, 2e7, true, "timeout_s = 2e+07"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(mdopt_comm_create_nccl2(c.id, c.size, c.rank, c.device, c.timeout_s,
                                      c.out ? &comm : nullptr),
              MDOPT_INVALID_ARGUMENT)
        << c.needle;
    const std::string message = mdopt_last_error();
    EXPECT_NE(message.find("mdopt_comm_create_nccl2"), std::string::npos) << message;
    EXPECT_NE(message.find(c.needle), std::string::npos) << message << " lacks " << c.needle;
    EXPECT_EQ(comm, nullptr);
  }
  EXPECT_EQ(mdopt_comm_nccl_id(nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("id is NULL"), std::string::npos);
  // The original entry point checks the same way (its timeout is 600 s).
  EXPECT_EQ(mdopt_comm_create_nccl(id.bytes, 2, 2, 0, &comm), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("rank = 2"), std::string::npos) << mdopt_last_error();
  EXPECT_EQ(mdopt_comm_create_nccl(id.bytes, 1, 0, -2, &comm), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(comm, nullptr);
  if (NcclBackendBuilt()) return;
  EXPECT_EQ(mdopt_comm_nccl_id(&id), MDOPT_UNSUPPORTED);
  EXPECT_NE(std::string(mdopt_last_error()).find("no NCCL backend"), std::string::npos)
      << mdopt_last_error();
  EXPECT_EQ(mdopt_comm_create_nccl2(&id, 1, 0, 0, 30.0, &comm), MDOPT_UNSUPPORTED);
  EXPECT_NE(std::string(mdopt_last_error()).find("no NCCL backend"), std::string::npos)
      << mdopt_last_error();
  EXPECT_EQ(comm, nullptr);
}

// With NCCL built, a bad rank or size is refused before any device is touched.
TEST(NcclAbi, BadRankIsInvalidWhenBuilt) {
  if (!NcclBackendBuilt()) GTEST_SKIP() << "this build has no NCCL backend";
  char id[MDOPT_NCCL_UNIQUE_ID_BYTES] = {};
  mdopt_comm* comm = nullptr;
  EXPECT_EQ(mdopt_comm_create_nccl(id, 2, 5, 0, &comm), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_comm_create_nccl(id, 0, 0, 0, &comm), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(comm, nullptr);
}

}  // namespace
}  // namespace mdopt
