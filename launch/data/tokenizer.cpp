#include "launch/data/tokenizer.h"

#include <array>

#include "core/error.h"

namespace helix {
namespace {

// Index = token id. Order verified against facebook/esm2_t6_8M_UR50D vocab.txt.
// clang-format off
constexpr std::array<std::string_view, kEsmVocabSize> kTokens = {
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>"};
// clang-format on

// Byte -> residue id (or -1), built once from kTokens.
struct ResidueTable {
  std::array<int8_t, 256> id{};
  constexpr ResidueTable() {
    for (auto& v : id) v = -1;
    for (int32_t t = 0; t < kEsmVocabSize; ++t) {
      if (kTokens[static_cast<size_t>(t)].size() != 1) continue;
      const char c = kTokens[static_cast<size_t>(t)][0];
      id[static_cast<uint8_t>(c)] = static_cast<int8_t>(t);
      if (c >= 'A' && c <= 'Z') id[static_cast<uint8_t>(c - 'A' + 'a')] = static_cast<int8_t>(t);
    }
  }
};
constexpr ResidueTable kResidues{};

static_assert(kResidues.id['L'] == kEsmFirstStandardId && kResidues.id['C'] == 23 &&
              kResidues.id['-'] == 30);

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

}  // namespace

std::string_view esm_token(int32_t id) {
  HELIX_CHECK(id >= 0 && id < kEsmVocabSize, "esm_token: expected an id in [0, {}), got {}",
              kEsmVocabSize, id);
  return kTokens[static_cast<size_t>(id)];
}

int32_t esm_residue_id(char c) { return kResidues.id[static_cast<uint8_t>(c)]; }

std::vector<int32_t> esm_encode(std::string_view text, const EsmEncodeOptions& opt) {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 2);
  if (opt.add_special_tokens) ids.push_back(kEsmClsId);
  bool in_unknown_run = false;  // EsmTokenizer gives one <unk> per run of unknown characters
  for (size_t i = 0; i < text.size();) {
    const char c = text[i];
    if (is_space(c)) {
      in_unknown_run = false;
      ++i;
      continue;
    }
    if (c == '<') {  // a written-out special token?
      int32_t special = -1;
      for (int32_t t = 0; t < kEsmVocabSize && special < 0; ++t) {
        const std::string_view tok = kTokens[static_cast<size_t>(t)];
        if (tok.size() > 1 && text.substr(i, tok.size()) == tok) special = t;
      }
      if (special >= 0) {
        in_unknown_run = false;
        ids.push_back(special);
        i += kTokens[static_cast<size_t>(special)].size();
        continue;
      }
    }
    const int32_t r = esm_residue_id(c);
    if (r >= 0) {
      ids.push_back(r);
    } else if (!in_unknown_run) {
      ids.push_back(kEsmUnkId);
    }
    in_unknown_run = r < 0;
    ++i;
  }
  if (opt.add_special_tokens) ids.push_back(kEsmEosId);
  return ids;
}

std::string esm_decode(std::span<const int32_t> ids) {
  std::string out;
  out.reserve(ids.size());
  for (const int32_t id : ids) out += esm_token(id);
  return out;
}

}  // namespace helix
