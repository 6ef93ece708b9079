#pragma once
// UTF-8 as RFC 3629 defines it (no overlong forms, no UTF-16 surrogates, nothing above U+10FFFF):
// validation, repair and encoding. The one implementation behind the tokenizer, the JSONL
// validator, text generation and the server's request checks.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace strata {

// U+FFFD, what an invalid byte becomes.
inline constexpr char kUtf8Replacement[] = "\xEF\xBF\xBD";

// Length (1..4) of the valid, complete sequence starting at s[i], with its code point; 0 when the
// bytes there are not one. Requires i < s.size().
int Utf8SequenceLength(std::string_view s, size_t i, uint32_t* code_point = nullptr);
// Whether `s` is valid UTF-8; on false, `bad_offset` (when given) is the offset of the first
// byte that does not start a valid sequence.
bool IsValidUtf8(std::string_view s, size_t* bad_offset = nullptr);
// Whether s[i..] is a proper prefix of some valid sequence (a character cut off at the end).
bool IsTruncatedUtf8Tail(std::string_view s, size_t i);
// The length of `s` without a last character whose lead byte announces more bytes than follow (a
// streaming decoder holds those back until the next token completes them).
size_t CompleteUtf8Prefix(std::string_view s);
// Every byte that is not part of a valid sequence replaced by U+FFFD (a valid `s` is returned as
// it is): text that can always go into a protobuf string.
std::string SanitizeUtf8(std::string_view s);
// As SanitizeUtf8, except that an incomplete character at the very end is kept as raw bytes.
std::string SanitizeUtf8KeepingTail(std::string_view s);
// Appends the UTF-8 encoding of `code_point` (<= U+10FFFF).
void AppendUtf8(uint32_t code_point, std::string* out);

}  // namespace strata
