#pragma once
// Tokenizer built from a Hugging Face `tokenizer.json` (+ optional `tokenizer_config.json`).
//
// Supports the BPE model in both families used by Llama-class checkpoints:
//  * SentencePiece style (Llama 2, Mistral, stories260K): normalizer Prepend("▁") + Replace(" ", "▁"),
//    byte_fallback to <0xXX> pieces, decoder that inverts it.
//  * Byte-level style (GPT-2, Llama 3, Qwen2/3): Split pre-tokenizer with the file's own regex
//    (PCRE2 with UTF + UCP), ByteLevel byte<->unicode mapping, optional NFC normalizer.
// Merges may be "a b" strings or ["a", "b"] pairs; rank = position in the list; `ignore_merges`
// (Llama 3) looks whole words up first. Added/special tokens are matched in the raw text before the
// model runs (leftmost-longest; lstrip/rstrip/single_word honoured; `normalized` tokens are matched
// on the normalized text). Also understood: Metaspace pre-tokenizer/decoder, NFD/NFKC/NFKD,
// Lowercase and Strip normalizers, Split behaviours, Bert/Roberta post-processors. Anything else
// (e.g. WordPiece/Unigram models) is refused with UNIMPLEMENTED naming the file and field.
// Results are meant to be id-for-id identical to Hugging Face `tokenizers`.
//
// BOS/EOS: the post_processor (TemplateProcessing) decides what Encode(..., true) adds; when
// tokenizer_config.json sets add_bos_token / add_eos_token, that flag wins (as in
// LlamaTokenizerFast). bos_id/eos_ids/pad_id come from tokenizer_config.json's bos_token /
// eos_token / pad_token; without a config, BOS is the template's first token and EOS the first of
// "</s>", "<|endoftext|>", "<|end_of_text|>" present.
//
// Thread safety: immutable after construction except for an internal, mutex-guarded cache of
// encoded words; Encode/Decode are safe to call concurrently.
// Torch-free: this header and its library do not depend on LibTorch (PCRE2 and ICU only).

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` (for add_bos_token /
  // add_eos_token and the bos/eos token strings). Errors name the file and the field.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDirectory(const std::string& dir);
  // Loads from explicit paths; `config_path` may be empty.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFiles(const std::string& tokenizer_json_path,
                                                              const std::string& config_path);

  // The byte-level tokenizer of the embedded default model: ids 0..2 are <unk>, <s>, </s>;
  // id 3 + b is byte b (so vocab 259). BOS is added on Encode(add_special_tokens=true). Text is
  // taken as plain bytes ("<s>" in the text is not matched); EOS is 2, no pad.
  static std::unique_ptr<Tokenizer> ByteLevelDefault();

  // Encodes UTF-8 text. With `add_special_tokens`, adds BOS (and EOS) as the tokenizer's
  // post-processor / tokenizer_config.json says. Added/special token strings in `text` become their
  // ids whatever `add_special_tokens` is (HF's default). Invalid UTF-8 bytes are encoded as U+FFFD.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const = 0;

  // Decodes ids to UTF-8 text; special tokens are dropped when `skip_special_tokens`.
  // Incomplete UTF-8 sequences at the end are kept as raw bytes (callers streaming text buffer them);
  // invalid bytes elsewhere become U+FFFD. Ids outside the vocabulary are skipped.
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::vector<int32_t> eos_ids() const = 0;
  virtual std::optional<int32_t> pad_id() const = 0;
  // The id of a token string, if it is in the vocabulary or the added tokens.
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::string IdToToken(int32_t id) const = 0;
  // Whether Encode(..., true) prepends BOS.
  virtual bool adds_bos() const = 0;
};

}  // namespace strata
