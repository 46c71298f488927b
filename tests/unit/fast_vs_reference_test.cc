#include <gtest/gtest.h>
#include "test_util.h"
namespace mdopt { namespace {
TEST(Placeholder, Builds) {}
}}
