#pragma once
// The ESM-2 alphabet: the 33 token ids of transformers' EsmTokenizer (facebook/esm2_* vocab.txt,
// the order of fair-esm's `proteinseq_toks` between the prepended <cls> <pad> <eos> <unk> and the
// appended <null_1> <mask>). One table serves the FASTA reader (which characters are residues), the
// masking (which ids are standard amino acids) and the text encoder used by tests and tools.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace helix {

// Special ids (EsmTokenizer for ESM-2).
inline constexpr int32_t kEsmClsId = 0;
inline constexpr int32_t kEsmPadId = 1;
inline constexpr int32_t kEsmEosId = 2;
inline constexpr int32_t kEsmUnkId = 3;
inline constexpr int32_t kEsmNullId = 31;  // <null_1>, never produced from text residues
inline constexpr int32_t kEsmMaskId = 32;
inline constexpr int32_t kEsmVocabSize = 33;
// The 20 standard amino acids are the contiguous ids 4..23 (L A G V S E R T I D P K Q N F Y M H W
// C); MLM's "random amino acid" replacement draws from them.
inline constexpr int32_t kEsmFirstStandardId = 4;
inline constexpr int32_t kEsmNumStandard = 20;
// Label of positions the loss ignores (PyTorch's and HF's ignore_index).
inline constexpr int32_t kIgnoreLabel = -100;

// Token string of an id in [0, 33): "<cls>", "L", ..., "<mask>".
std::string_view esm_token(int32_t id);

// Id of one residue character, or -1 when it is outside the alphabet. Residues are the 25 letters
// of the vocab (L A G V S E R T I D P K Q N F Y M H W C X B U Z O, either case: lower case is
// upper-cased, where EsmTokenizer would give <unk>) and the gap symbols '.' and '-'. Not residues:
// 'J' (absent from the ESM-2 vocab), digits, '*', punctuation, whitespace, control and non-ASCII
// bytes.
int32_t esm_residue_id(char c);

struct EsmEncodeOptions {
  bool add_special_tokens = true;  // <cls> ... <eos> around the text, as EsmTokenizer's default
};

// Text to ids the way EsmTokenizer does it: the special tokens written out ("<mask>", "<pad>", ...)
// are single tokens, every other non-whitespace character is one token, whitespace separates and is
// dropped. A run of unknown characters between known tokens or whitespace gives one <unk>
// (EsmTokenizer splits on its vocab, then on whitespace, and looks the leftover pieces up whole).
// Lower-case residues are upper-cased (see esm_residue_id): the one place where helix differs from
// EsmTokenizer.
std::vector<int32_t> esm_encode(std::string_view text, const EsmEncodeOptions& opt = {});

// Ids back to text, special tokens written out; throws on an id outside [0, 33).
std::string esm_decode(std::span<const int32_t> ids);

}  // namespace helix
