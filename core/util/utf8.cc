#include "core/util/utf8.h"

namespace strata {

int Utf8SequenceLength(std::string_view s, size_t i, uint32_t* code_point) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    if (code_point != nullptr) *code_point = b0;
    return 1;
  }
  int len;
  uint32_t cp;
  uint32_t min;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (int k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  if (code_point != nullptr) *code_point = cp;
  return len;
}

bool IsValidUtf8(std::string_view s, size_t* bad_offset) {
  for (size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const int n = Utf8SequenceLength(s, i);
    if (n == 0) {
      if (bad_offset != nullptr) *bad_offset = i;
      return false;
    }
    i += n;
  }
  return true;
}

bool IsTruncatedUtf8Tail(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  int len;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
  } else {
    return false;
  }
  const size_t have = s.size() - i;
  if (have >= static_cast<size_t>(len)) return false;
  for (size_t k = 1; k < have; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return false;
    // Second-byte constraints that make the sequence impossible to complete validly.
    if (k == 1) {
      if (b0 == 0xE0 && b < 0xA0) return false;
      if (b0 == 0xED && b > 0x9F) return false;
      if (b0 == 0xF0 && b < 0x90) return false;
      if (b0 == 0xF4 && b > 0x8F) return false;
    }
  }
  return true;
}

size_t CompleteUtf8Prefix(std::string_view s) {
  const size_t n = s.size();
  // The lead byte of the last character is at most 3 bytes back.
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    size_t need = 1;
    if ((c & 0xE0) == 0xC0) {
      need = 2;
    } else if ((c & 0xF0) == 0xE0) {
      need = 3;
    } else if ((c & 0xF8) == 0xF0) {
      need = 4;
    }
    return back < need ? n - back : n;
  }
  return n;  // only continuation bytes (invalid anyway): leave as is
}

namespace {

std::string Repair(std::string_view s, bool keep_tail) {
  if (IsValidUtf8(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const int n = Utf8SequenceLength(s, i);
    if (n > 0) {
      out.append(s.data() + i, static_cast<size_t>(n));
      i += static_cast<size_t>(n);
    } else if (keep_tail && IsTruncatedUtf8Tail(s, i)) {
      out.append(s.data() + i, s.size() - i);
      break;
    } else {
      out += kUtf8Replacement;
      ++i;
    }
  }
  return out;
}

}  // namespace

std::string SanitizeUtf8(std::string_view s) { return Repair(s, /*keep_tail=*/false); }

std::string SanitizeUtf8KeepingTail(std::string_view s) { return Repair(s, /*keep_tail=*/true); }

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace strata
