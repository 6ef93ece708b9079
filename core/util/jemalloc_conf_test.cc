// The malloc_conf of core/util/jemalloc_conf.cc reaches jemalloc (test binaries link it like the
// server): freed pages are kept mapped (no decay), unless MALLOC_CONF overrides it.
#include <jemalloc/jemalloc.h>
#include <sys/types.h>

#include <cstdlib>
#include <vector>

#include "gtest/gtest.h"

namespace {

ssize_t OptMs(const char* name) {
  ssize_t value = 0;
  size_t size = sizeof(value);
  EXPECT_EQ(mallctl(name, &value, &size, nullptr, 0), 0) << name;
  return value;
}

TEST(JemallocConfTest, DecayIsOff) {
  if (std::getenv("MALLOC_CONF") != nullptr) GTEST_SKIP() << "MALLOC_CONF is set";
  std::vector<char> touch(1 << 20);  // jemalloc initialises at the first allocation
  EXPECT_EQ(OptMs("opt.dirty_decay_ms"), -1);
  EXPECT_EQ(OptMs("opt.muzzy_decay_ms"), -1);
}

}  // namespace
