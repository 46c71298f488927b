// mdopt_comm_nccl_unique_id and mdopt_comm_create_nccl through the C ABI, in every build:
// null arguments are refused first; a build without CUDA/NCCL answers MDOPT_UNSUPPORTED with
// a message that says so; a build with them but no usable GPU is skipped (the NCCL
// communicator itself is tested on a GPU, tests/cuda/nccl_comm_test).
#include <gtest/gtest.h>

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
