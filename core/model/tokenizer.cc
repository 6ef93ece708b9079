#include "core/model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "core/util/utf8.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace {

using json = nlohmann::json;

// Debian's Abseil keeps its own string_view type; convert explicitly at the boundaries.
inline absl::string_view AV(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers.
// ---------------------------------------------------------------------------------------------

// Validation, repair and encoding: core/util/utf8.h.
int ValidUtf8Len(std::string_view s, size_t i, uint32_t* cp_out = nullptr) {
  return Utf8SequenceLength(s, i, cp_out);
}

// Decoder output: invalid bytes in the middle become U+FFFD; an incomplete character at the very
// end is kept as raw bytes so that streaming callers can complete it with the next token.
std::string FinishDecodedUtf8(std::string s) { return SanitizeUtf8KeepingTail(s); }

// Length of the character at s[i] in valid UTF-8 (1 for stray bytes, never 0).
size_t CharLen(std::string_view s, size_t i) {
  const int n = ValidUtf8Len(s, i);
  return n > 0 ? static_cast<size_t>(n) : 1;
}

bool IsAscii(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

void ReplaceAll(std::string* s, std::string_view from, std::string_view to) {
  if (from.empty() || s->find(from) == std::string::npos) return;
  std::string out;
  out.reserve(s->size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s->find(from, pos);
    if (hit == std::string::npos) break;
    out.append(*s, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  out.append(*s, pos, std::string::npos);
  *s = std::move(out);
}

std::string ByteToken(uint8_t b) { return absl::StrFormat("<0x%02X>", b); }

// Parses "<0xXX>" (either hex case); returns -1 when `tok` is not a byte token.
int ParseByteToken(std::string_view tok) {
  if (tok.size() != 6 || tok[0] != '<' || tok[1] != '0' || tok[2] != 'x' || tok[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(tok[3]);
  const int lo = hex(tok[4]);
  if (hi < 0 || lo < 0) return -1;
  return hi * 16 + lo;
}

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode mapping: printable Latin-1 bytes map to themselves, the other bytes to
// U+0100 + n in byte order.
// ---------------------------------------------------------------------------------------------

struct ByteLevelTable {
  std::array<std::string, 256> byte_to_utf8;
  std::array<int16_t, 512> cp_to_byte;  // -1 when the code point is not a mapped byte
};

const ByteLevelTable& GetByteLevelTable() {
  static const ByteLevelTable* table = [] {
    auto* t = new ByteLevelTable();
    t->cp_to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      AppendUtf8(cp, &t->byte_to_utf8[b]);
      t->cp_to_byte[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return *table;
}

std::string ByteLevelEncode(std::string_view s) {
  const auto& t = GetByteLevelTable();
  std::string out;
  out.reserve(s.size() * 2);
  for (char c : s) out += t.byte_to_utf8[static_cast<unsigned char>(c)];
  return out;
}

// Maps a byte-level token back to bytes; returns false when a character is not a mapped byte.
bool ByteLevelDecode(std::string_view tok, std::string* out) {
  const auto& t = GetByteLevelTable();
  std::string bytes;
  bytes.reserve(tok.size());
  for (size_t i = 0; i < tok.size();) {
    uint32_t cp = 0;
    const int n = ValidUtf8Len(tok, i, &cp);
    if (n == 0 || cp >= t.cp_to_byte.size() || t.cp_to_byte[cp] < 0) return false;
    bytes.push_back(static_cast<char>(t.cp_to_byte[cp]));
    i += n;
  }
  out->append(bytes);
  return true;
}

// ---------------------------------------------------------------------------------------------
// PCRE2 regex (UTF + UCP, JIT when available). Immutable and shareable across threads: match data
// and JIT stacks are per call.
// ---------------------------------------------------------------------------------------------

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      return absl::InvalidArgumentError(absl::StrCat("regex /", AV(pattern), "/ does not compile at offset ",
                                                     offset, ": ", reinterpret_cast<char*>(buf)));
    }
    // JIT is an optimisation; the interpreter is used when it is unavailable.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    return std::unique_ptr<Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [begin, end) byte ranges of all non-overlapping, non-empty matches in `s`, which
  // must be valid UTF-8.
  void FindAll(std::string_view s, std::vector<std::pair<size_t, size_t>>* out) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    pcre2_match_context* mctx = nullptr;
    pcre2_jit_stack* stack = nullptr;
    size_t pos = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK,
                           md, mctx);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT && stack == nullptr) {
        mctx = pcre2_match_context_create(nullptr);
        stack = pcre2_jit_stack_create(64 * 1024, 256 * 1024 * 1024, nullptr);
        pcre2_jit_stack_assign(mctx, nullptr, stack);
        continue;
      }
      if (rc < 0) {
        if (rc != PCRE2_ERROR_NOMATCH) {
          // Resource limits on pathological input: retry with the interpreter once, else treat
          // the rest of the text as unmatched.
          rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                           PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, nullptr);
          if (rc < 0) break;
        } else {
          break;
        }
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0];
      const size_t e = ov[1];
      if (e <= b) {
        if (b >= s.size()) break;
        pos = b + CharLen(s, b);
        continue;
      }
      out->emplace_back(b, e);
      pos = e;
    }
    pcre2_match_data_free(md);
    if (stack != nullptr) pcre2_jit_stack_free(stack);
    if (mctx != nullptr) pcre2_match_context_free(mctx);
  }

  // Replaces all matches with `content`.
  std::string ReplaceAll(std::string_view s, std::string_view content) const {
    std::vector<std::pair<size_t, size_t>> m;
    FindAll(s, &m);
    std::string out;
    size_t pos = 0;
    for (const auto& [b, e] : m) {
      out.append(s.substr(pos, b - pos));
      out.append(content);
      pos = e;
    }
    out.append(s.substr(pos));
    return out;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// The GPT-2 pre-tokenisation regex used by ByteLevel(use_regex=true).
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// JSON helpers: every error names the file and the field.
// ---------------------------------------------------------------------------------------------

class JsonCtx {
 public:
  explicit JsonCtx(std::string file) : file_(std::move(file)) {}
  const std::string& file() const { return file_; }

  absl::Status Error(absl::string_view field, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": field '", field, "' ", what));
  }
  absl::Status Unsupported(absl::string_view field, absl::string_view what) const {
    return absl::UnimplementedError(absl::StrCat(file_, ": field '", field, "' ", what));
  }

  absl::StatusOr<const json*> Get(const json& obj, const std::string& key, absl::string_view field) const {
    if (!obj.is_object()) return Error(field, "is not inside an object");
    auto it = obj.find(key);
    if (it == obj.end()) return Error(field, "is missing");
    return &*it;
  }
  absl::StatusOr<std::string> GetString(const json& obj, const std::string& key,
                                        absl::string_view field) const {
    ASSIGN_OR_RETURN(const json* v, Get(obj, key, field));
    if (!v->is_string()) return Error(field, "must be a string");
    return v->get<std::string>();
  }
  // Optional members: absent or null gives the default; a wrong type is an error.
  absl::StatusOr<bool> OptBool(const json& obj, const std::string& key, absl::string_view field,
                               bool def) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return def;
    if (!it->is_boolean()) return Error(field, "must be a boolean");
    return it->get<bool>();
  }
  absl::StatusOr<std::string> OptString(const json& obj, const std::string& key, absl::string_view field,
                                        std::string def) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return def;
    if (!it->is_string()) return Error(field, "must be a string");
    return it->get<std::string>();
  }

 private:
  std::string file_;
};

// A pattern object {"String": s} or {"Regex": r}.
struct Pattern {
  std::string literal;
  std::shared_ptr<const Regex> regex;  // set for {"Regex": ...}
};

absl::StatusOr<Pattern> ParsePattern(const JsonCtx& ctx, const json& obj, const std::string& field) {
  ASSIGN_OR_RETURN(const json* p, ctx.Get(obj, "pattern", field + ".pattern"));
  Pattern out;
  if (p->is_string()) {
    out.literal = p->get<std::string>();
    return out;
  }
  if (p->is_object() && p->contains("String") && (*p)["String"].is_string()) {
    out.literal = (*p)["String"].get<std::string>();
    return out;
  }
  if (p->is_object() && p->contains("Regex") && (*p)["Regex"].is_string()) {
    auto re = Regex::Compile((*p)["Regex"].get<std::string>());
    if (!re.ok()) return ctx.Error(field + ".pattern.Regex", re.status().message());
    out.regex = std::shared_ptr<const Regex>(std::move(re).value());
    return out;
  }
  return ctx.Error(field + ".pattern", "must be {\"String\": ...} or {\"Regex\": ...}");
}

// ---------------------------------------------------------------------------------------------
// Normalizers.
// ---------------------------------------------------------------------------------------------

struct Normalizer {
  enum class Kind { kPrepend, kReplace, kUnicode, kLowercase, kStrip };
  Kind kind;
  std::string text;  // prepend / replacement content
  Pattern pattern;   // replace
  const icu::Normalizer2* icu = nullptr;
  bool nfc = false;  // ASCII fast path is valid for NFC/NFD/NFKC/NFKD alike
  bool strip_left = false, strip_right = false;

  void Apply(std::string* s) const {
    switch (kind) {
      case Kind::kPrepend:
        if (!s->empty()) s->insert(0, text);
        break;
      case Kind::kReplace:
        if (pattern.regex) {
          *s = pattern.regex->ReplaceAll(*s, text);
        } else {
          ReplaceAll(s, pattern.literal, text);
        }
        break;
      case Kind::kUnicode: {
        if (IsAscii(*s)) break;  // ASCII is invariant under all four normalization forms
        UErrorCode status = U_ZERO_ERROR;
        icu::UnicodeString u =
            icu::UnicodeString::fromUTF8(icu::StringPiece(s->data(), static_cast<int32_t>(s->size())));
        icu::UnicodeString n = icu->normalize(u, status);
        if (U_SUCCESS(status)) {
          s->clear();
          n.toUTF8String(*s);
        }
        break;
      }
      case Kind::kLowercase: {
        icu::UnicodeString u =
            icu::UnicodeString::fromUTF8(icu::StringPiece(s->data(), static_cast<int32_t>(s->size())));
        u.toLower(icu::Locale::getRoot());
        s->clear();
        u.toUTF8String(*s);
        break;
      }
      case Kind::kStrip: {
        size_t b = 0, e = s->size();
        if (strip_left) {
          while (b < e) {
            uint32_t cp = 0;
            const int n = ValidUtf8Len(*s, b, &cp);
            if (n == 0 || !u_isUWhiteSpace(static_cast<UChar32>(cp))) break;
            b += n;
          }
        }
        if (strip_right) {
          while (e > b) {
            size_t start = e - 1;
            while (start > b && (static_cast<unsigned char>((*s)[start]) & 0xC0) == 0x80) --start;
            uint32_t cp = 0;
            const int n = ValidUtf8Len(*s, start, &cp);
            if (n == 0 || start + n != e || !u_isUWhiteSpace(static_cast<UChar32>(cp))) break;
            e = start;
          }
        }
        *s = s->substr(b, e - b);
        break;
      }
    }
  }
};

absl::Status ParseNormalizer(const JsonCtx& ctx, const json& j, const std::string& field,
                             std::vector<Normalizer>* out) {
  if (j.is_null()) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::string type, ctx.GetString(j, "type", field + ".type"));
  if (type == "Sequence") {
    ASSIGN_OR_RETURN(const json* list, ctx.Get(j, "normalizers", field + ".normalizers"));
    if (!list->is_array()) return ctx.Error(field + ".normalizers", "must be an array");
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(ParseNormalizer(ctx, (*list)[i], absl::StrCat(field, ".normalizers[", i, "]"), out));
    }
    return absl::OkStatus();
  }
  Normalizer n;
  if (type == "Prepend") {
    n.kind = Normalizer::Kind::kPrepend;
    ASSIGN_OR_RETURN(n.text, ctx.GetString(j, "prepend", field + ".prepend"));
  } else if (type == "Replace") {
    n.kind = Normalizer::Kind::kReplace;
    ASSIGN_OR_RETURN(n.pattern, ParsePattern(ctx, j, field));
    ASSIGN_OR_RETURN(n.text, ctx.GetString(j, "content", field + ".content"));
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    n.kind = Normalizer::Kind::kUnicode;
    UErrorCode status = U_ZERO_ERROR;
    if (type == "NFC") n.icu = icu::Normalizer2::getNFCInstance(status);
    if (type == "NFD") n.icu = icu::Normalizer2::getNFDInstance(status);
    if (type == "NFKC") n.icu = icu::Normalizer2::getNFKCInstance(status);
    if (type == "NFKD") n.icu = icu::Normalizer2::getNFKDInstance(status);
    if (U_FAILURE(status) || n.icu == nullptr) {
      return absl::InternalError(absl::StrCat(ctx.file(), ": field '", field, "': ICU ", type,
                                              " normalizer unavailable: ", u_errorName(status)));
    }
  } else if (type == "Lowercase") {
    n.kind = Normalizer::Kind::kLowercase;
  } else if (type == "Strip") {
    n.kind = Normalizer::Kind::kStrip;
    ASSIGN_OR_RETURN(n.strip_left, ctx.OptBool(j, "strip_left", field + ".strip_left", true));
    ASSIGN_OR_RETURN(n.strip_right, ctx.OptBool(j, "strip_right", field + ".strip_right", true));
  } else {
    return ctx.Unsupported(field + ".type", absl::StrCat("normalizer '", type, "' is not supported"));
  }
  out->push_back(std::move(n));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers.
// ---------------------------------------------------------------------------------------------

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizer {
  enum class Kind { kSplit, kByteLevel, kMetaspace };
  enum class PrependScheme { kAlways, kFirst, kNever };
  Kind kind;
  // Split (also ByteLevel with use_regex, Metaspace with split).
  std::shared_ptr<const Regex> regex;
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  // ByteLevel.
  bool add_prefix_space = false;
  bool use_regex = false;
  // Metaspace.
  std::string replacement;
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = false;
};

struct Piece {
  std::string text;
  bool first;  // starts at offset 0 of the original input (for Metaspace prepend_scheme "first")
};

// Splits `text` into pieces per `behavior`; `spans` are the (sorted, disjoint) matches.
void SplitBySpans(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& spans,
                  SplitBehavior behavior, bool invert, std::vector<Piece>* out) {
  const std::string& text = piece.text;
  // Sequence of (begin, end, is_match) covering text.
  std::vector<std::tuple<size_t, size_t, bool>> parts;
  size_t pos = 0;
  for (const auto& [b, e] : spans) {
    if (b > pos) parts.emplace_back(pos, b, invert);
    parts.emplace_back(b, e, !invert);
    pos = e;
  }
  if (pos < text.size()) parts.emplace_back(pos, text.size(), invert);

  std::vector<std::pair<size_t, size_t>> ranges;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const auto& [b, e, m] : parts) {
        if (!m) ranges.emplace_back(b, e);
      }
      break;
    case SplitBehavior::kIsolated:
      for (const auto& [b, e, m] : parts) ranges.emplace_back(b, e);
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const auto& [b, e, m] : parts) {
        if (m && !ranges.empty() && !prev_match) {
          ranges.back().second = e;
        } else {
          ranges.emplace_back(b, e);
        }
        prev_match = m;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool pending = false;
      for (const auto& [b, e, m] : parts) {
        if (pending) {
          ranges.back().second = e;
          pending = m;
        } else {
          ranges.emplace_back(b, e);
          pending = m;
        }
      }
      break;
    }
    case SplitBehavior::kContiguous: {
      bool prev_match = false;
      for (const auto& [b, e, m] : parts) {
        if (m && prev_match && !ranges.empty()) {
          ranges.back().second = e;
        } else {
          ranges.emplace_back(b, e);
        }
        prev_match = m;
      }
      break;
    }
  }
  for (const auto& [b, e] : ranges) {
    if (e > b) out->push_back(Piece{text.substr(b, e - b), piece.first && b == 0});
  }
}

void FindLiteral(std::string_view text, std::string_view lit, std::vector<std::pair<size_t, size_t>>* out) {
  if (lit.empty()) return;
  size_t pos = 0;
  while ((pos = text.find(lit, pos)) != std::string_view::npos) {
    out->emplace_back(pos, pos + lit.size());
    pos += lit.size();
  }
}

absl::StatusOr<SplitBehavior> ParseBehavior(const JsonCtx& ctx, const std::string& b,
                                            const std::string& field) {
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  return ctx.Unsupported(field, absl::StrCat("split behavior '", b, "' is not supported"));
}

absl::Status ParsePreTokenizer(const JsonCtx& ctx, const json& j, const std::string& field,
                               std::shared_ptr<const Regex>* gpt2_regex, std::vector<PreTokenizer>* out) {
  if (j.is_null()) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::string type, ctx.GetString(j, "type", field + ".type"));
  if (type == "Sequence") {
    ASSIGN_OR_RETURN(const json* list, ctx.Get(j, "pretokenizers", field + ".pretokenizers"));
    if (!list->is_array()) return ctx.Error(field + ".pretokenizers", "must be an array");
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(ParsePreTokenizer(ctx, (*list)[i], absl::StrCat(field, ".pretokenizers[", i, "]"),
                                        gpt2_regex, out));
    }
    return absl::OkStatus();
  }
  PreTokenizer p;
  if (type == "Split") {
    p.kind = PreTokenizer::Kind::kSplit;
    ASSIGN_OR_RETURN(Pattern pat, ParsePattern(ctx, j, field));
    p.regex = pat.regex;
    p.literal = pat.literal;
    ASSIGN_OR_RETURN(std::string behavior, ctx.GetString(j, "behavior", field + ".behavior"));
    ASSIGN_OR_RETURN(p.behavior, ParseBehavior(ctx, behavior, field + ".behavior"));
    ASSIGN_OR_RETURN(p.invert, ctx.OptBool(j, "invert", field + ".invert", false));
  } else if (type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::kByteLevel;
    ASSIGN_OR_RETURN(p.add_prefix_space,
                     ctx.OptBool(j, "add_prefix_space", field + ".add_prefix_space", true));
    ASSIGN_OR_RETURN(p.use_regex, ctx.OptBool(j, "use_regex", field + ".use_regex", true));
    if (p.use_regex) {
      if (!*gpt2_regex) {
        ASSIGN_OR_RETURN(auto re, Regex::Compile(kGpt2Pattern));
        *gpt2_regex = std::shared_ptr<const Regex>(std::move(re));
      }
      p.regex = *gpt2_regex;
    }
  } else if (type == "Metaspace") {
    p.kind = PreTokenizer::Kind::kMetaspace;
    ASSIGN_OR_RETURN(p.replacement, ctx.OptString(j, "replacement", field + ".replacement", "\xE2\x96\x81"));
    ASSIGN_OR_RETURN(p.split, ctx.OptBool(j, "split", field + ".split", true));
    ASSIGN_OR_RETURN(bool add_prefix, ctx.OptBool(j, "add_prefix_space", field + ".add_prefix_space", true));
    ASSIGN_OR_RETURN(std::string scheme, ctx.OptString(j, "prepend_scheme", field + ".prepend_scheme",
                                                       add_prefix ? "always" : "never"));
    if (scheme == "always") {
      p.prepend_scheme = PreTokenizer::PrependScheme::kAlways;
    } else if (scheme == "first") {
      p.prepend_scheme = PreTokenizer::PrependScheme::kFirst;
    } else if (scheme == "never") {
      p.prepend_scheme = PreTokenizer::PrependScheme::kNever;
    } else {
      return ctx.Unsupported(field + ".prepend_scheme",
                             absl::StrCat("value '", scheme, "' is not supported"));
    }
  } else {
    return ctx.Unsupported(field + ".type", absl::StrCat("pre-tokenizer '", type, "' is not supported"));
  }
  out->push_back(std::move(p));
  return absl::OkStatus();
}

void ApplyPreTokenizer(const PreTokenizer& p, std::vector<Piece>* pieces) {
  std::vector<Piece> out;
  out.reserve(pieces->size());
  std::vector<std::pair<size_t, size_t>> spans;
  for (Piece& piece : *pieces) {
    switch (p.kind) {
      case PreTokenizer::Kind::kSplit:
        spans.clear();
        if (p.regex) {
          p.regex->FindAll(piece.text, &spans);
        } else {
          FindLiteral(piece.text, p.literal, &spans);
        }
        SplitBySpans(piece, spans, p.behavior, p.invert, &out);
        break;
      case PreTokenizer::Kind::kByteLevel: {
        if (p.add_prefix_space && (piece.text.empty() || piece.text[0] != ' ')) piece.text.insert(0, " ");
        std::vector<Piece> sub;
        if (p.use_regex) {
          spans.clear();
          p.regex->FindAll(piece.text, &spans);
          SplitBySpans(piece, spans, SplitBehavior::kIsolated, false, &sub);
        } else {
          sub.push_back(std::move(piece));
        }
        for (Piece& s : sub) {
          if (s.text.empty()) continue;
          out.push_back(Piece{ByteLevelEncode(s.text), s.first});
        }
        break;
      }
      case PreTokenizer::Kind::kMetaspace: {
        ReplaceAll(&piece.text, " ", p.replacement);
        const bool prepend = p.prepend_scheme == PreTokenizer::PrependScheme::kAlways ||
                             (p.prepend_scheme == PreTokenizer::PrependScheme::kFirst && piece.first);
        if (prepend && piece.text.compare(0, p.replacement.size(), p.replacement) != 0) {
          piece.text.insert(0, p.replacement);
        }
        if (p.split) {
          spans.clear();
          FindLiteral(piece.text, p.replacement, &spans);
          SplitBySpans(piece, spans, SplitBehavior::kMergedWithNext, false, &out);
        } else if (!piece.text.empty()) {
          out.push_back(std::move(piece));
        }
        break;
      }
    }
  }
  *pieces = std::move(out);
}

// ---------------------------------------------------------------------------------------------
// Decoders: a chain over the token strings, as in HF tokenizers.
// ---------------------------------------------------------------------------------------------

struct DecoderStep {
  enum class Kind { kReplace, kByteFallback, kFuse, kStrip, kByteLevel, kMetaspace };
  Kind kind;
  Pattern pattern;                // replace
  std::string content;            // replace content / strip char / metaspace replacement
  int start = 0, stop = 0;        // strip
  bool strip_first_space = true;  // metaspace (prepend_scheme != never)
};

absl::Status ParseDecoder(const JsonCtx& ctx, const json& j, const std::string& field,
                          std::vector<DecoderStep>* out) {
  if (j.is_null()) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::string type, ctx.GetString(j, "type", field + ".type"));
  if (type == "Sequence") {
    ASSIGN_OR_RETURN(const json* list, ctx.Get(j, "decoders", field + ".decoders"));
    if (!list->is_array()) return ctx.Error(field + ".decoders", "must be an array");
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(ParseDecoder(ctx, (*list)[i], absl::StrCat(field, ".decoders[", i, "]"), out));
    }
    return absl::OkStatus();
  }
  DecoderStep d;
  if (type == "Replace") {
    d.kind = DecoderStep::Kind::kReplace;
    ASSIGN_OR_RETURN(d.pattern, ParsePattern(ctx, j, field));
    ASSIGN_OR_RETURN(d.content, ctx.GetString(j, "content", field + ".content"));
  } else if (type == "ByteFallback") {
    d.kind = DecoderStep::Kind::kByteFallback;
  } else if (type == "Fuse") {
    d.kind = DecoderStep::Kind::kFuse;
  } else if (type == "Strip") {
    d.kind = DecoderStep::Kind::kStrip;
    ASSIGN_OR_RETURN(d.content, ctx.GetString(j, "content", field + ".content"));
    auto s = j.find("start");
    auto e = j.find("stop");
    if (s == j.end() || !s->is_number_integer()) return ctx.Error(field + ".start", "must be an integer");
    if (e == j.end() || !e->is_number_integer()) return ctx.Error(field + ".stop", "must be an integer");
    d.start = s->get<int>();
    d.stop = e->get<int>();
  } else if (type == "ByteLevel") {
    d.kind = DecoderStep::Kind::kByteLevel;
  } else if (type == "Metaspace") {
    d.kind = DecoderStep::Kind::kMetaspace;
    ASSIGN_OR_RETURN(d.content, ctx.OptString(j, "replacement", field + ".replacement", "\xE2\x96\x81"));
    ASSIGN_OR_RETURN(bool add_prefix, ctx.OptBool(j, "add_prefix_space", field + ".add_prefix_space", true));
    ASSIGN_OR_RETURN(std::string scheme, ctx.OptString(j, "prepend_scheme", field + ".prepend_scheme",
                                                       add_prefix ? "always" : "never"));
    d.strip_first_space = scheme != "never";
  } else {
    return ctx.Unsupported(field + ".type", absl::StrCat("decoder '", type, "' is not supported"));
  }
  out->push_back(std::move(d));
  return absl::OkStatus();
}

void ApplyDecoder(const DecoderStep& d, std::vector<std::string>* tokens) {
  switch (d.kind) {
    case DecoderStep::Kind::kReplace:
      for (std::string& t : *tokens) {
        if (d.pattern.regex) {
          t = d.pattern.regex->ReplaceAll(t, d.content);
        } else {
          ReplaceAll(&t, d.pattern.literal, d.content);
        }
      }
      break;
    case DecoderStep::Kind::kByteFallback:
      // Raw bytes are kept; invalid UTF-8 is repaired once on the final text.
      for (std::string& t : *tokens) {
        const int b = ParseByteToken(t);
        if (b >= 0) t.assign(1, static_cast<char>(b));
      }
      break;
    case DecoderStep::Kind::kFuse: {
      std::string all;
      for (const std::string& t : *tokens) all += t;
      tokens->assign(1, std::move(all));
      break;
    }
    case DecoderStep::Kind::kStrip:
      for (std::string& t : *tokens) {
        size_t b = 0, e = t.size();
        const size_t n = d.content.size();
        if (n == 0) continue;
        for (int k = 0; k < d.start && e - b >= n && t.compare(b, n, d.content) == 0; ++k) b += n;
        for (int k = 0; k < d.stop && e - b >= n && t.compare(e - n, n, d.content) == 0; ++k) e -= n;
        t = t.substr(b, e - b);
      }
      break;
    case DecoderStep::Kind::kByteLevel: {
      std::string all;
      for (const std::string& t : *tokens) {
        if (!ByteLevelDecode(t, &all)) all += t;
      }
      tokens->assign(1, std::move(all));
      break;
    }
    case DecoderStep::Kind::kMetaspace:
      for (size_t i = 0; i < tokens->size(); ++i) {
        std::string& t = (*tokens)[i];
        ReplaceAll(&t, d.content, " ");
        if (i == 0 && d.strip_first_space && !t.empty() && t[0] == ' ') t.erase(0, 1);
      }
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// BPE model.
// ---------------------------------------------------------------------------------------------

struct MergeInfo {
  int32_t rank;
  int32_t new_id;
};

inline uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

class BpeModel {
 public:
  absl::Status Load(const JsonCtx& ctx, const json& model) {
    ASSIGN_OR_RETURN(const json* vocab, ctx.Get(model, "vocab", "model.vocab"));
    if (!vocab->is_object()) return ctx.Error("model.vocab", "must be an object {token: id}");
    int32_t max_id = -1;
    token_to_id_.reserve(vocab->size());
    for (auto it = vocab->begin(); it != vocab->end(); ++it) {
      if (!it.value().is_number_integer()) {
        return ctx.Error(absl::StrCat("model.vocab[\"", it.key(), "\"]"), "must be an integer id");
      }
      const int64_t id = it.value().get<int64_t>();
      if (id < 0 || id > (1 << 30)) {
        return ctx.Error(absl::StrCat("model.vocab[\"", it.key(), "\"]"), "id out of range");
      }
      token_to_id_[it.key()] = static_cast<int32_t>(id);
      max_id = std::max(max_id, static_cast<int32_t>(id));
    }
    // The id table is dense: a stray huge id ({"x": 266662777}) would allocate gigabytes. Real
    // vocabularies number their tokens 0..N-1; allow holes, not an id far beyond the token count.
    const int64_t id_limit = 2 * static_cast<int64_t>(vocab->size()) + 1024;
    if (max_id >= id_limit) {
      return ctx.Error("model.vocab", absl::StrCat("ids must be (nearly) dense: the largest id is ", max_id,
                                                   " for ", vocab->size(), " tokens"));
    }
    id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
    for (const auto& [tok, id] : token_to_id_) id_to_token_[id] = tok;

    ASSIGN_OR_RETURN(const json* merges, ctx.Get(model, "merges", "model.merges"));
    if (!merges->is_array()) return ctx.Error("model.merges", "must be an array");
    merges_.reserve(merges->size());
    std::string a, b;
    for (size_t i = 0; i < merges->size(); ++i) {
      const json& m = (*merges)[i];
      if (m.is_string()) {
        const std::string& s = m.get_ref<const std::string&>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || sp == 0 || sp + 1 >= s.size() ||
            s.find(' ', sp + 1) != std::string::npos) {
          return ctx.Error(absl::StrCat("model.merges[", i, "]"),
                           absl::StrCat("must be \"a b\", got \"", s, "\""));
        }
        a.assign(s, 0, sp);
        b.assign(s, sp + 1, std::string::npos);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return ctx.Error(absl::StrCat("model.merges[", i, "]"), "must be \"a b\" or [\"a\", \"b\"]");
      }
      auto ia = token_to_id_.find(a);
      auto ib = token_to_id_.find(b);
      if (ia == token_to_id_.end() || ib == token_to_id_.end()) {
        return ctx.Error(absl::StrCat("model.merges[", i, "]"),
                         absl::StrCat("refers to a token not in model.vocab: \"", a, "\" \"", b, "\""));
      }
      auto in = token_to_id_.find(a + b);
      if (in == token_to_id_.end()) {
        return ctx.Error(absl::StrCat("model.merges[", i, "]"),
                         absl::StrCat("merged token \"", a, b, "\" is not in model.vocab"));
      }
      // The first occurrence of a pair defines its rank.
      merges_.try_emplace(PairKey(ia->second, ib->second), MergeInfo{static_cast<int32_t>(i), in->second});
    }

    ASSIGN_OR_RETURN(byte_fallback_, ctx.OptBool(model, "byte_fallback", "model.byte_fallback", false));
    ASSIGN_OR_RETURN(fuse_unk_, ctx.OptBool(model, "fuse_unk", "model.fuse_unk", false));
    ASSIGN_OR_RETURN(ignore_merges_, ctx.OptBool(model, "ignore_merges", "model.ignore_merges", false));
    ASSIGN_OR_RETURN(
        prefix_, ctx.OptString(model, "continuing_subword_prefix", "model.continuing_subword_prefix", ""));
    ASSIGN_OR_RETURN(suffix_, ctx.OptString(model, "end_of_word_suffix", "model.end_of_word_suffix", ""));
    ASSIGN_OR_RETURN(std::string unk, ctx.OptString(model, "unk_token", "model.unk_token", ""));
    if (!unk.empty()) {
      auto it = token_to_id_.find(unk);
      if (it == token_to_id_.end()) {
        return ctx.Error("model.unk_token", absl::StrCat("'", unk, "' is not in model.vocab"));
      }
      unk_id_ = it->second;
    }
    byte_ids_.fill(-1);
    if (byte_fallback_) {
      for (int b = 0; b < 256; ++b) {
        auto it = token_to_id_.find(ByteToken(static_cast<uint8_t>(b)));
        if (it != token_to_id_.end()) byte_ids_[b] = it->second;
      }
    }
    return absl::OkStatus();
  }

  int32_t size() const { return static_cast<int32_t>(id_to_token_.size()); }
  std::optional<int32_t> Find(std::string_view tok) const {
    auto it = token_to_id_.find(AV(tok));
    if (it == token_to_id_.end()) return std::nullopt;
    return it->second;
  }
  const std::string* Token(int32_t id) const {
    if (id < 0 || id >= size() || id_to_token_[id].empty()) return nullptr;
    return &id_to_token_[id];
  }

  // Appends the ids of one pre-tokenized word. Results of short words are cached.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      if (auto id = Find(word)) {
        out->push_back(*id);
        return;
      }
    }
    const bool cacheable = word.size() <= kMaxCachedWordBytes;
    Shard* shard = nullptr;
    if (cacheable) {
      shard = &shards_[absl::Hash<absl::string_view>()(AV(word)) % kNumShards];
      std::lock_guard<std::mutex> lock(shard->mu);
      auto it = shard->map.find(AV(word));
      if (it != shard->map.end()) {
        out->insert(out->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t start = out->size();
    MergeWord(word, out);
    if (cacheable) {
      std::vector<int32_t> ids(out->begin() + static_cast<std::ptrdiff_t>(start), out->end());
      std::lock_guard<std::mutex> lock(shard->mu);
      if (shard->map.size() >= kMaxCacheEntriesPerShard) shard->map.clear();
      shard->map.emplace(std::string(word), std::move(ids));
    }
  }

 private:
  static constexpr size_t kMaxCachedWordBytes = 64;
  static constexpr size_t kNumShards = 16;
  static constexpr size_t kMaxCacheEntriesPerShard = 8192;

  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };

  void MergeWord(std::string_view word, std::vector<int32_t>* out) const {
    std::vector<Symbol> syms;
    syms.reserve(word.size());
    bool last_is_unk = false;
    std::string buf;
    for (size_t i = 0; i < word.size();) {
      const size_t n = CharLen(word, i);
      const bool is_first = i == 0;
      const bool is_last = i + n >= word.size();
      std::string_view ch = word.substr(i, n);
      std::optional<int32_t> id;
      if (prefix_.empty() && suffix_.empty()) {
        id = Find(ch);
      } else {
        buf.clear();
        if (!is_first) buf += prefix_;
        buf.append(ch);
        if (is_last) buf += suffix_;
        id = Find(buf);
      }
      i += n;
      auto push = [&](int32_t v) {
        const int32_t idx = static_cast<int32_t>(syms.size());
        syms.push_back(Symbol{v, idx - 1, -1, true});
        if (idx > 0) syms[idx - 1].next = idx;
      };
      if (id) {
        push(*id);
        last_is_unk = false;
        continue;
      }
      if (byte_fallback_) {
        bool all = true;
        for (char c : ch) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
        if (all) {
          for (char c : ch) push(byte_ids_[static_cast<unsigned char>(c)]);
          last_is_unk = false;
          continue;
        }
      }
      if (unk_id_) {
        if (!(fuse_unk_ && last_is_unk)) push(*unk_id_);
        last_is_unk = true;
      }
      // Without an unk token the character is dropped (as HF tokenizers does).
    }
    if (syms.empty()) return;

    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
    auto consider = [&](int32_t pos) {
      const int32_t nx = syms[pos].next;
      if (nx < 0) return;
      auto it = merges_.find(PairKey(syms[pos].id, syms[nx].id));
      if (it != merges_.end()) heap.push(Candidate{it->second.rank, pos, it->second.new_id});
    };
    for (int32_t p = 0; p + 1 < static_cast<int32_t>(syms.size()); ++p) consider(p);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      Symbol& s = syms[c.pos];
      if (!s.alive || s.next < 0) continue;
      auto it = merges_.find(PairKey(s.id, syms[s.next].id));
      if (it == merges_.end() || it->second.new_id != c.new_id) continue;
      Symbol& r = syms[s.next];
      s.id = c.new_id;
      r.alive = false;
      s.next = r.next;
      if (r.next >= 0) syms[r.next].prev = c.pos;
      if (s.prev >= 0) consider(s.prev);
      consider(c.pos);
    }
    for (int32_t p = 0; p >= 0; p = syms[p].next) out->push_back(syms[p].id);
  }

  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  std::vector<std::string> id_to_token_;
  absl::flat_hash_map<uint64_t, MergeInfo> merges_;
  std::optional<int32_t> unk_id_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  std::string prefix_, suffix_;
  std::array<int32_t, 256> byte_ids_{};

  struct Shard {
    std::mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> map;
  };
  mutable std::array<Shard, kNumShards> shards_;
};

// ---------------------------------------------------------------------------------------------
// Added tokens.
// ---------------------------------------------------------------------------------------------

struct AddedToken {
  int32_t id;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

struct Segment {
  size_t begin, end;
  int32_t added_id;  // -1 for plain text
};

bool IsWordChar(uint32_t cp) { return cp == '_' || u_isalnum(static_cast<UChar32>(cp)); }

// Leftmost-longest matcher over a set of added tokens.
class AddedMatcher {
 public:
  // `text` is what is matched: the content, or the normalized content for normalized tokens.
  void Add(const AddedToken* t, std::string text) {
    if (text.empty()) return;
    by_first_[static_cast<unsigned char>(text[0])].push_back(Entry{std::move(text), t});
    empty_ = false;
  }
  void Finish() {
    for (auto& v : by_first_) {
      std::stable_sort(v.begin(), v.end(),
                       [](const Entry& a, const Entry& b) { return a.text.size() > b.text.size(); });
    }
  }
  bool empty() const { return empty_; }

  // Splits `text` into plain and added-token segments (empty plain segments are dropped).
  void Split(std::string_view text, std::vector<Segment>* out) const {
    size_t plain_begin = 0;
    size_t i = 0;
    while (i < text.size()) {
      const Entry* hit = nullptr;
      for (const Entry& en : by_first_[static_cast<unsigned char>(text[i])]) {
        if (text.compare(i, en.text.size(), en.text) != 0) continue;
        if (en.token->single_word && !IsSingleWord(text, i, i + en.text.size())) continue;
        hit = &en;
        break;
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      size_t b = i;
      size_t e = i + hit->text.size();
      if (hit->token->lstrip) {
        while (b > plain_begin) {
          size_t s = b - 1;
          while (s > plain_begin && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
          uint32_t cp = 0;
          if (ValidUtf8Len(text, s, &cp) == 0 || !u_isUWhiteSpace(static_cast<UChar32>(cp))) break;
          b = s;
        }
      }
      if (hit->token->rstrip) {
        while (e < text.size()) {
          uint32_t cp = 0;
          const int n = ValidUtf8Len(text, e, &cp);
          if (n == 0 || !u_isUWhiteSpace(static_cast<UChar32>(cp))) break;
          e += n;
        }
      }
      if (b > plain_begin) out->push_back(Segment{plain_begin, b, -1});
      out->push_back(Segment{b, e, hit->token->id});
      plain_begin = e;
      i = e;
    }
    if (plain_begin < text.size()) out->push_back(Segment{plain_begin, text.size(), -1});
  }

 private:
  static bool IsSingleWord(std::string_view text, size_t b, size_t e) {
    if (b > 0) {
      size_t s = b - 1;
      while (s > 0 && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
      uint32_t cp = 0;
      if (ValidUtf8Len(text, s, &cp) > 0 && IsWordChar(cp)) return false;
    }
    if (e < text.size()) {
      uint32_t cp = 0;
      if (ValidUtf8Len(text, e, &cp) > 0 && IsWordChar(cp)) return false;
    }
    return true;
  }

  struct Entry {
    std::string text;
    const AddedToken* token;
  };
  std::array<std::vector<Entry>, 256> by_first_;
  bool empty_ = true;
};

// A token named in tokenizer_config.json: a string, {"content": ...} or null.
std::optional<std::string> ConfigTokenString(const json& config, const std::string& key) {
  auto it = config.find(key);
  if (it == config.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// The tokenizer.json tokenizer.
// ---------------------------------------------------------------------------------------------

class HfTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path,
                                                         const std::string& config_path) {
    auto tok = std::unique_ptr<HfTokenizer>(new HfTokenizer());
    RETURN_IF_ERROR(tok->LoadTokenizerJson(path));
    RETURN_IF_ERROR(tok->LoadConfig(path, config_path));
    return std::unique_ptr<Tokenizer>(std::move(tok));
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    if (add_special_tokens) ids = prefix_;
    const std::string clean = SanitizeUtf8(text);
    std::vector<Segment> segs;
    raw_matcher_.Split(clean, &segs);
    for (const Segment& s : segs) {
      if (s.added_id >= 0) {
        ids.push_back(s.added_id);
      } else {
        EncodeSegment(std::string_view(clean).substr(s.begin, s.end - s.begin), s.begin == 0, &ids);
      }
    }
    if (add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      auto a = added_by_id_.find(id);
      if (a != added_by_id_.end()) {
        if (skip_special_tokens && a->second->special) continue;
        tokens.push_back(a->second->content);
        continue;
      }
      if (const std::string* t = model_.Token(id)) tokens.push_back(*t);
    }
    if (decoders_.empty()) {
      std::string joined;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i > 0) joined += ' ';
        joined += tokens[i];
      }
      return FinishDecodedUtf8(std::move(joined));
    }
    for (const DecoderStep& d : decoders_) ApplyDecoder(d, &tokens);
    std::string out;
    for (const std::string& t : tokens) out += t;
    return FinishDecodedUtf8(std::move(out));
  }

  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::vector<int32_t> eos_ids() const override { return eos_; }
  std::optional<int32_t> pad_id() const override { return pad_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    auto it = added_by_content_.find(AV(token));
    if (it != added_by_content_.end()) return it->second;
    return model_.Find(token);
  }
  std::string IdToToken(int32_t id) const override {
    auto a = added_by_id_.find(id);
    if (a != added_by_id_.end()) return a->second->content;
    const std::string* t = model_.Token(id);
    return t ? *t : std::string();
  }
  bool adds_bos() const override {
    return bos_ && std::find(prefix_.begin(), prefix_.end(), *bos_) != prefix_.end();
  }

 private:
  HfTokenizer() = default;

  void EncodeSegment(std::string_view text, bool at_start, std::vector<int32_t>* ids) const {
    std::string norm(text);
    for (const Normalizer& n : normalizers_) n.Apply(&norm);
    if (normalized_matcher_.empty()) {
      EncodePlain(norm, at_start, ids);
      return;
    }
    std::vector<Segment> segs;
    normalized_matcher_.Split(norm, &segs);
    for (const Segment& s : segs) {
      if (s.added_id >= 0) {
        ids->push_back(s.added_id);
      } else {
        EncodePlain(std::string_view(norm).substr(s.begin, s.end - s.begin), at_start && s.begin == 0, ids);
      }
    }
  }

  void EncodePlain(std::string_view text, bool at_start, std::vector<int32_t>* ids) const {
    if (text.empty()) return;
    std::vector<Piece> pieces;
    pieces.push_back(Piece{std::string(text), at_start});
    for (const PreTokenizer& p : pre_tokenizers_) ApplyPreTokenizer(p, &pieces);
    for (const Piece& p : pieces) model_.EncodeWord(p.text, ids);
  }

  absl::Status LoadTokenizerJson(const std::string& path) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    JsonCtx ctx(path);
    json root;
    try {
      root = json::parse(text);
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON: ", e.what()));
    }
    if (!root.is_object()) return ctx.Error("(root)", "must be a JSON object");
    try {
      return LoadFromRoot(ctx, root);
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": unexpected JSON structure: ", e.what()));
    }
  }

  absl::Status LoadFromRoot(const JsonCtx& ctx, const json& root) {
    ASSIGN_OR_RETURN(const json* model, ctx.Get(root, "model", "model"));
    if (!model->is_object()) return ctx.Error("model", "must be an object");
    std::string type;
    if (auto t = model->find("type"); t != model->end()) {
      if (!t->is_string()) return ctx.Error("model.type", "must be a string");
      type = t->get<std::string>();
    } else {
      type = model->contains("merges") ? "BPE" : "(missing)";
    }
    if (type != "BPE") {
      return ctx.Unsupported("model.type", absl::StrCat("'", type, "' is not supported (only BPE)"));
    }
    RETURN_IF_ERROR(model_.Load(ctx, *model));

    static const json kNull = nullptr;
    auto member = [&](const char* key) -> const json& {
      auto it = root.find(key);
      return it == root.end() ? kNull : *it;
    };
    RETURN_IF_ERROR(ParseNormalizer(ctx, member("normalizer"), "normalizer", &normalizers_));
    std::shared_ptr<const Regex> gpt2;
    RETURN_IF_ERROR(
        ParsePreTokenizer(ctx, member("pre_tokenizer"), "pre_tokenizer", &gpt2, &pre_tokenizers_));
    RETURN_IF_ERROR(ParseDecoder(ctx, member("decoder"), "decoder", &decoders_));

    // Added tokens.
    const json& added = member("added_tokens");
    if (!added.is_null() && !added.is_array()) return ctx.Error("added_tokens", "must be an array");
    vocab_size_ = model_.size();
    if (added.is_array()) {
      added_.reserve(added.size());
      for (size_t i = 0; i < added.size(); ++i) {
        const std::string f = absl::StrCat("added_tokens[", i, "]");
        const json& a = added[i];
        if (!a.is_object()) return ctx.Error(f, "must be an object");
        auto id = a.find("id");
        if (id == a.end() || !id->is_number_integer() || id->get<int64_t>() < 0 ||
            id->get<int64_t>() > (1 << 30)) {
          return ctx.Error(f + ".id", "must be a non-negative integer");
        }
        auto t = std::make_unique<AddedToken>();
        t->id = id->get<int32_t>();
        ASSIGN_OR_RETURN(t->content, ctx.GetString(a, "content", f + ".content"));
        ASSIGN_OR_RETURN(t->single_word, ctx.OptBool(a, "single_word", f + ".single_word", false));
        ASSIGN_OR_RETURN(t->lstrip, ctx.OptBool(a, "lstrip", f + ".lstrip", false));
        ASSIGN_OR_RETURN(t->rstrip, ctx.OptBool(a, "rstrip", f + ".rstrip", false));
        ASSIGN_OR_RETURN(t->normalized, ctx.OptBool(a, "normalized", f + ".normalized", false));
        ASSIGN_OR_RETURN(t->special, ctx.OptBool(a, "special", f + ".special", false));
        vocab_size_ = std::max(vocab_size_, t->id + 1);
        added_.push_back(std::move(t));
      }
    }
    for (const auto& t : added_) {
      added_by_id_[t->id] = t.get();
      added_by_content_[t->content] = t->id;
      // As in HF tokenizers: `normalized` tokens are matched, in their normalized form, on the
      // normalized text; the others on the raw text.
      if (t->normalized && !normalizers_.empty()) {
        std::string norm = SanitizeUtf8(t->content);
        for (const Normalizer& n : normalizers_) n.Apply(&norm);
        normalized_matcher_.Add(t.get(), std::move(norm));
      } else {
        raw_matcher_.Add(t.get(), t->content);
      }
    }
    raw_matcher_.Finish();
    normalized_matcher_.Finish();

    // Post-processor: the ids around a single sequence.
    RETURN_IF_ERROR(ParsePostProcessor(ctx, member("post_processor"), "post_processor"));
    return absl::OkStatus();
  }

  absl::Status ParsePostProcessor(const JsonCtx& ctx, const json& j, const std::string& field) {
    if (j.is_null()) return absl::OkStatus();
    ASSIGN_OR_RETURN(std::string type, ctx.GetString(j, "type", field + ".type"));
    if (type == "Sequence") {
      ASSIGN_OR_RETURN(const json* list, ctx.Get(j, "processors", field + ".processors"));
      if (!list->is_array()) return ctx.Error(field + ".processors", "must be an array");
      for (size_t i = 0; i < list->size(); ++i) {
        RETURN_IF_ERROR(ParsePostProcessor(ctx, (*list)[i], absl::StrCat(field, ".processors[", i, "]")));
      }
      return absl::OkStatus();
    }
    if (type == "ByteLevel") return absl::OkStatus();  // offsets only
    if (type == "TemplateProcessing") {
      ASSIGN_OR_RETURN(const json* single, ctx.Get(j, "single", field + ".single"));
      if (!single->is_array()) return ctx.Error(field + ".single", "must be an array");
      const json* specials = nullptr;
      if (auto it = j.find("special_tokens"); it != j.end() && it->is_object()) specials = &*it;
      bool seen_sequence = false;
      std::vector<int32_t> prefix, suffix;
      for (size_t i = 0; i < single->size(); ++i) {
        const std::string f = absl::StrCat(field, ".single[", i, "]");
        const json& item = (*single)[i];
        if (item.is_object() && item.contains("Sequence")) {
          seen_sequence = true;
          continue;
        }
        if (!item.is_object() || !item.contains("SpecialToken")) {
          return ctx.Error(f, "must be {\"Sequence\": ...} or {\"SpecialToken\": ...}");
        }
        ASSIGN_OR_RETURN(std::string name, ctx.GetString(item["SpecialToken"], "id", f + ".SpecialToken.id"));
        std::vector<int32_t> tok_ids;
        if (specials && specials->contains(name) && (*specials)[name].contains("ids") &&
            (*specials)[name]["ids"].is_array()) {
          for (const json& v : (*specials)[name]["ids"]) {
            if (!v.is_number_integer())
              return ctx.Error(field + ".special_tokens." + name + ".ids", "must be integers");
            tok_ids.push_back(v.get<int32_t>());
          }
        } else if (auto id = TokenToId(name)) {
          tok_ids.push_back(*id);
        } else {
          return ctx.Error(f + ".SpecialToken.id", absl::StrCat("'", name, "' is not a known token"));
        }
        auto& dst = seen_sequence ? suffix : prefix;
        dst.insert(dst.end(), tok_ids.begin(), tok_ids.end());
      }
      prefix_.insert(prefix_.end(), prefix.begin(), prefix.end());
      suffix_.insert(suffix_.end(), suffix.begin(), suffix.end());
      return absl::OkStatus();
    }
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      for (const char* key : {"cls", "sep"}) {
        ASSIGN_OR_RETURN(const json* v, ctx.Get(j, key, field + "." + key));
        if (!v->is_array() || v->size() != 2 || !(*v)[1].is_number_integer()) {
          return ctx.Error(field + "." + key, "must be [token, id]");
        }
      }
      prefix_.push_back(j["cls"][1].get<int32_t>());
      suffix_.push_back(j["sep"][1].get<int32_t>());
      return absl::OkStatus();
    }
    return ctx.Unsupported(field + ".type", absl::StrCat("post-processor '", type, "' is not supported"));
  }

  absl::Status LoadConfig(const std::string& tokenizer_path, const std::string& config_path) {
    json config = json::object();
    if (!config_path.empty()) {
      ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
      try {
        config = json::parse(text);
      } catch (const json::exception& e) {
        return absl::InvalidArgumentError(absl::StrCat(config_path, ": invalid JSON: ", e.what()));
      }
      if (!config.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(config_path, ": must be a JSON object"));
      }
    }
    JsonCtx ctx(config_path.empty() ? tokenizer_path : config_path);
    auto resolve = [&](const std::string& key) -> absl::StatusOr<std::optional<int32_t>> {
      std::optional<std::string> s = ConfigTokenString(config, key);
      if (!s) return std::optional<int32_t>();
      std::optional<int32_t> id = TokenToId(*s);
      if (!id) return ctx.Error(key, absl::StrCat("names '", *s, "', which is not in the vocabulary"));
      return id;
    };
    ASSIGN_OR_RETURN(bos_, resolve("bos_token"));
    ASSIGN_OR_RETURN(std::optional<int32_t> eos, resolve("eos_token"));
    ASSIGN_OR_RETURN(pad_, resolve("pad_token"));
    if (!config.contains("bos_token") && !prefix_.empty()) bos_ = prefix_.front();
    if (!config.contains("eos_token")) {
      // No config: fall back to the conventional end tokens when the vocabulary has them.
      for (const char* name : {"</s>", "<|endoftext|>", "<|end_of_text|>"}) {
        if (auto id = TokenToId(name)) {
          eos = id;
          break;
        }
      }
    }
    if (eos) eos_.push_back(*eos);

    // add_bos_token / add_eos_token override the post-processor (as LlamaTokenizerFast does).
    auto flag = [&](const char* key) -> absl::StatusOr<std::optional<bool>> {
      auto it = config.find(key);
      if (it == config.end() || it->is_null()) return std::optional<bool>();
      if (!it->is_boolean()) return ctx.Error(key, "must be a boolean");
      return std::optional<bool>(it->get<bool>());
    };
    ASSIGN_OR_RETURN(std::optional<bool> add_bos, flag("add_bos_token"));
    ASSIGN_OR_RETURN(std::optional<bool> add_eos, flag("add_eos_token"));
    if (add_bos && bos_) {
      prefix_.erase(std::remove(prefix_.begin(), prefix_.end(), *bos_), prefix_.end());
      if (*add_bos) prefix_.insert(prefix_.begin(), *bos_);
    } else if (add_bos && *add_bos && !bos_) {
      return ctx.Error("add_bos_token", "is true but no bos_token is defined");
    }
    if (add_eos && eos) {
      suffix_.erase(std::remove(suffix_.begin(), suffix_.end(), *eos), suffix_.end());
      if (*add_eos) suffix_.push_back(*eos);
    } else if (add_eos && *add_eos && !eos) {
      return ctx.Error("add_eos_token", "is true but no eos_token is defined");
    }
    return absl::OkStatus();
  }

  BpeModel model_;
  std::vector<Normalizer> normalizers_;
  std::vector<PreTokenizer> pre_tokenizers_;
  std::vector<DecoderStep> decoders_;
  std::vector<std::unique_ptr<AddedToken>> added_;
  absl::flat_hash_map<int32_t, const AddedToken*> added_by_id_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  AddedMatcher raw_matcher_;
  AddedMatcher normalized_matcher_;
  std::vector<int32_t> prefix_, suffix_;
  std::optional<int32_t> bos_, pad_;
  std::vector<int32_t> eos_;
  int32_t vocab_size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// The embedded byte-level default: <unk>=0, <s>=1, </s>=2, byte b = 3 + b.
// ---------------------------------------------------------------------------------------------

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kUnk = 0, kBos = 1, kEos = 2, kOffset = 3;

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() + 1);
    if (add_special_tokens) ids.push_back(kBos);
    for (char c : text) ids.push_back(kOffset + static_cast<unsigned char>(c));
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) {
      if (id >= kOffset && id < kOffset + 256) {
        out.push_back(static_cast<char>(id - kOffset));
      } else if (id >= 0 && id < kOffset && !skip_special_tokens) {
        out += IdToToken(id);
      }
    }
    return FinishDecodedUtf8(std::move(out));
  }
  int32_t vocab_size() const override { return kOffset + 256; }
  std::optional<int32_t> bos_id() const override { return kBos; }
  std::vector<int32_t> eos_ids() const override { return {kEos}; }
  std::optional<int32_t> pad_id() const override { return std::nullopt; }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (token == "<unk>") return kUnk;
    if (token == "<s>") return kBos;
    if (token == "</s>") return kEos;
    const int b = ParseByteToken(token);
    if (b >= 0) return kOffset + b;
    return std::nullopt;
  }
  std::string IdToToken(int32_t id) const override {
    switch (id) {
      case kUnk:
        return "<unk>";
      case kBos:
        return "<s>";
      case kEos:
        return "</s>";
      default:
        if (id >= kOffset && id < kOffset + 256) return ByteToken(static_cast<uint8_t>(id - kOffset));
        return "";
    }
  }
  bool adds_bos() const override { return true; }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDirectory(const std::string& dir) {
  const std::string json_path = dir + "/tokenizer.json";
  const std::string config_path = dir + "/tokenizer_config.json";
  if (!PathExists(json_path)) {
    return absl::NotFoundError(absl::StrCat("tokenizer directory '", dir, "' has no tokenizer.json"));
  }
  return FromFiles(json_path, PathExists(config_path) ? config_path : std::string());
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFiles(const std::string& tokenizer_json_path,
                                                                const std::string& config_path) {
  return HfTokenizer::Load(tokenizer_json_path, config_path);
}

std::unique_ptr<Tokenizer> Tokenizer::ByteLevelDefault() { return std::make_unique<ByteTokenizer>(); }

}  // namespace strata
