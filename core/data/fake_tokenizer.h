#pragma once
// Test-only tokenizer with predictable ids, for the data tests (not linked into the library).
//  * id 0 <unk>, 1 BOS, 2 EOS; byte b -> 3 + b (like Tokenizer::ByteLevelDefault()).
//  * prepend_space: Encode() prepends ' ' to any text, like the SentencePiece Prepend("▁")
//    normalizer of Llama 2 / stories260K, so " x" encoded alone gets an extra leading space token.
//  * merge_ab: the byte pair "ab" becomes the single id kAbId (to create a merge across a
//    prompt/completion boundary).

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/model/tokenizer.h"

namespace strata::testing {

class FakeTokenizer : public Tokenizer {
 public:
  static constexpr int32_t kAbId = 300;

  explicit FakeTokenizer(bool prepend_space = false, bool merge_ab = false, bool adds_bos = true)
      : prepend_space_(prepend_space), merge_ab_(merge_ab), adds_bos_(adds_bos) {}

  static int32_t Id(char c) { return 3 + static_cast<unsigned char>(c); }
  static std::vector<int32_t> Ids(std::string_view s) {
    std::vector<int32_t> out;
    for (char c : s) out.push_back(Id(c));
    return out;
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override {
    std::string t = prepend_space_ ? " " + std::string(text) : std::string(text);
    std::vector<int32_t> ids;
    if (add_special_tokens && adds_bos_) ids.push_back(1);
    for (size_t i = 0; i < t.size(); ++i) {
      if (merge_ab_ && t[i] == 'a' && i + 1 < t.size() && t[i + 1] == 'b') {
        ids.push_back(kAbId);
        ++i;
      } else {
        ids.push_back(Id(t[i]));
      }
    }
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id == kAbId) {
        out += "ab";
      } else if (id >= 3 && id < 259) {
        out += static_cast<char>(id - 3);
      }
    }
    return out;
  }
  int32_t vocab_size() const override { return 301; }
  std::optional<int32_t> bos_id() const override { return 1; }
  std::vector<int32_t> eos_ids() const override { return {2}; }
  std::optional<int32_t> pad_id() const override { return std::nullopt; }
  std::optional<int32_t> TokenToId(std::string_view token) const override { return std::nullopt; }
  std::string IdToToken(int32_t id) const override { return std::to_string(id); }
  bool adds_bos() const override { return adds_bos_; }

 private:
  bool prepend_space_;
  bool merge_ab_;
  bool adds_bos_;
};

}  // namespace strata::testing
