// ESM-2 tokenizer: ids against hand-written lists. The encode expectations were produced by
// transformers 5.17.0 `EsmTokenizer` built from the ESM-2 vocab.txt (33 lines, order below), except
// where noted (lower case: helix upper-cases residues, EsmTokenizer gives <unk>).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "launch/data/tokenizer.h"

namespace helix {
namespace {

using Ids = std::vector<int32_t>;

TEST(Tokenizer, VocabOrderMatchesEsm2) {
  const std::vector<std::string> expected = {
      "<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E",        "R",
      "T",     "I",     "D",     "P",     "K", "Q", "N", "F", "Y", "M",        "H",
      "W",     "C",     "X",     "B",     "U", "Z", "O", ".", "-", "<null_1>", "<mask>"};
  ASSERT_EQ(static_cast<int32_t>(expected.size()), kEsmVocabSize);
  for (int32_t id = 0; id < kEsmVocabSize; ++id)
    EXPECT_EQ(esm_token(id), expected[id]) << "id " << id;
  EXPECT_EQ(kEsmClsId, 0);
  EXPECT_EQ(kEsmPadId, 1);
  EXPECT_EQ(kEsmEosId, 2);
  EXPECT_EQ(kEsmUnkId, 3);
  EXPECT_EQ(kEsmNullId, 31);
  EXPECT_EQ(kEsmMaskId, 32);
  EXPECT_THROW(esm_token(33), Error);
  EXPECT_THROW(esm_token(-1), Error);
}

TEST(Tokenizer, EveryTokenWrittenOut) {
  const Ids all = esm_encode("<cls><pad><eos><unk>LAGVSERTIDPKQNFYMHWCXBUZO.-<null_1><mask>",
                             {.add_special_tokens = false});
  Ids expected;
  for (int32_t i = 0; i < 33; ++i) expected.push_back(i);
  EXPECT_EQ(all, expected);
  Ids with_specials = {0};
  with_specials.insert(with_specials.end(), expected.begin(), expected.end());
  with_specials.push_back(2);
  EXPECT_EQ(esm_encode("<cls><pad><eos><unk>LAGVSERTIDPKQNFYMHWCXBUZO.-<null_1><mask>"),
            with_specials);
}

TEST(Tokenizer, MatchesEsmTokenizer) {
  EXPECT_EQ(esm_encode("MKTAYIAK"), (Ids{0, 20, 15, 11, 5, 19, 12, 5, 15, 2}));
  EXPECT_EQ(esm_encode("MKTAYIAK", {.add_special_tokens = false}),
            (Ids{20, 15, 11, 5, 19, 12, 5, 15}));
  EXPECT_EQ(esm_encode("A<mask>C"), (Ids{0, 5, 32, 23, 2}));
  EXPECT_EQ(esm_encode("<mask><mask>"), (Ids{0, 32, 32, 2}));
  EXPECT_EQ(esm_encode("X-."), (Ids{0, 24, 30, 29, 2}));
  EXPECT_EQ(esm_encode("M K T"), (Ids{0, 20, 15, 11, 2}));
  EXPECT_EQ(esm_encode("A\tC\nD"), (Ids{0, 5, 23, 13, 2}));
  EXPECT_EQ(esm_encode(""), (Ids{0, 2}));
  // Unknown characters: one <unk> per run between known tokens or whitespace.
  EXPECT_EQ(esm_encode("MJJK"), (Ids{0, 20, 3, 15, 2}));
  EXPECT_EQ(esm_encode("J J"), (Ids{0, 3, 3, 2}));
  EXPECT_EQ(esm_encode("JMJ"), (Ids{0, 3, 20, 3, 2}));
  EXPECT_EQ(esm_encode("A*"), (Ids{0, 5, 3, 2}));
  EXPECT_EQ(esm_encode("AB12CD"), (Ids{0, 5, 25, 3, 23, 13, 2}));
  EXPECT_EQ(esm_encode("<FOO>"), (Ids{0, 3, 18, 28, 28, 3, 2}));
  EXPECT_EQ(esm_encode("<MASK>"), (Ids{0, 3, 20, 5, 8, 15, 3, 2}));
}

TEST(Tokenizer, LowerCaseIsUpperCased) {
  // Deliberate difference: EsmTokenizer maps "mkt" to one <unk>; helix reads it as "MKT".
  EXPECT_EQ(esm_encode("mkt"), esm_encode("MKT"));
  EXPECT_EQ(esm_encode("mkt"), (Ids{0, 20, 15, 11, 2}));
}

TEST(Tokenizer, ResidueTable) {
  const std::string residues = "LAGVSERTIDPKQNFYMHWCXBUZO.-";
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    const size_t at = residues.find(static_cast<char>((c >= 'a' && c <= 'z') ? c - 32 : c));
    const int32_t expected =
        (b != 0 && at != std::string::npos) ? static_cast<int32_t>(at) + 4 : -1;
    EXPECT_EQ(esm_residue_id(c), expected) << "byte " << b;
  }
  EXPECT_EQ(esm_residue_id('J'), -1);  // not in the ESM-2 vocab
  EXPECT_EQ(esm_residue_id('*'), -1);
  // The 20 standard amino acids are ids 4..23.
  EXPECT_EQ(
      esm_decode(Ids{4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23}),
      "LAGVSERTIDPKQNFYMHWC");
}

TEST(Tokenizer, DecodeRoundTrip) {
  const std::string text = "<cls>MKT<mask>AY<unk>IAK<eos><pad><pad>";
  EXPECT_EQ(esm_decode(esm_encode(text, {.add_special_tokens = false})), text);
  EXPECT_THROW(esm_decode(Ids{5, 40}), Error);
}

}  // namespace
}  // namespace helix
