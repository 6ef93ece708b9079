#include "core/util/utf8.h"

#include <gtest/gtest.h>

namespace strata {
namespace {

TEST(Utf8Test, ValidatesAsRfc3629) {
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("Åland, 東京, 😀"));
  size_t bad = 0;
  EXPECT_FALSE(IsValidUtf8("ab\xFF", &bad));
  EXPECT_EQ(bad, 2u);
  EXPECT_FALSE(IsValidUtf8("\x80"));              // a lone continuation byte
  EXPECT_FALSE(IsValidUtf8("\xF0\x8F\xBF\xBF"));  // overlong 4-byte
  EXPECT_FALSE(IsValidUtf8("\xE0\x80\x80"));      // overlong
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_TRUE(IsValidUtf8("\xF4\x8F\xBF\xBF"));   // U+10FFFF
  uint32_t cp = 0;
  EXPECT_EQ(Utf8SequenceLength("\xE6\x9D\xB1", 0, &cp), 3);
  EXPECT_EQ(cp, 0x6771u);
}

TEST(Utf8Test, RepairsAndEncodes) {
  EXPECT_EQ(SanitizeUtf8("a\xFF"
                         "b"),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(SanitizeUtf8("ok \xE6\x9D"), "ok \xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(SanitizeUtf8KeepingTail("ok \xE6\x9D"), "ok \xE6\x9D");  // a character cut off at the end
  EXPECT_EQ(CompleteUtf8Prefix("ok \xE6\x9D"), 3u);
  EXPECT_EQ(CompleteUtf8Prefix("ok \xE6\x9D\xB1"), 6u);
  std::string out;
  AppendUtf8(0x1F600, &out);
  EXPECT_EQ(out, "😀");
}

}  // namespace
}  // namespace strata
