"""Options end at a real boundary, checked with SmolLM2's real tokenizer (BPE).

The per-character tiny tokenizer cannot show these: a word is several characters but one BPE
token with its leading space, and "\\n\\n" is a single token. The generation layer's row logic
(pipeline.lm.generation) is fed the real token ids of a text, one by one, as if the model had
sampled them."""

import time

import pytest
import torch

from mcts.options import newline, sentence_end, token_cap
from pipeline.lm.generation import newline_token_ids
from pipeline.lm.stopping import Row, Rule, row_ends, row_result

# BPE pieces: "So", " we", " subtract", " ", "1", ..., "7", " from", " both", " sides", ",", " uns",
# "impl", "ifiable", " otherwise": a cap inside the number or "unsimplifiable" cuts a word.
LONG = "So we subtract 1234567 from both sides, unsimplifiable otherwise"


def token_ids(tokenizer, pieces):
    """Token ids of text pieces, "\n\n" as SmolLM2's single double-newline token (which the
    model samples, though text tokenization splits it before a word)."""
    ids = []
    for piece in pieces:
        ids += [tokenizer.convert_tokens_to_ids("ĊĊ")] if piece == "\n\n" else \
            tokenizer(piece, add_special_tokens=False).input_ids
    return ids


def scripted(tokenizer, text, stop, cap, rollout_tokens=0):
    """The Generation the decoding loop makes if the model samples exactly these tokens
    (`text`: a string, tokenized, or a list of pieces for `token_ids`)."""
    ids = token_ids(tokenizer, [text] if isinstance(text, str) else text)
    newline_ids = newline_token_ids(tokenizer) if stop.kind == "newline" else None
    rule = Rule(tokenizer, torch.tensor([tokenizer.eos_token_id]), stop, newline_ids, cap,
                 rollout_tokens, lambda option: False)
    row = Row([], [])
    for token in ids:
        row.tokens.append(token)
        row.logprobs.append(-1.0)
        is_newline = newline_ids is not None and token in newline_ids.tolist()
        if row_ends(row, rule, False, is_newline):
            break
    return row_result(tokenizer, row, stop), ids


def test_the_tokenizer_loads_fast_and_is_bpe(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.convert_tokens_to_ids("ĊĊ") != tok.unk_token_id  # "\n\n" is one token
    assert tok("= 46\n\n", add_special_tokens=False).input_ids[-1] == tok.convert_tokens_to_ids("ĊĊ")
    start = time.perf_counter()
    type(tok).from_pretrained(tok.name_or_path)
    print(f"SmolLM2 tokenizer load: {time.perf_counter() - start:.2f} s")


@pytest.mark.parametrize("stop", [token_cap(7), newline(7), sentence_end(7)])
@pytest.mark.parametrize("rollout", [0, 5])
def test_the_cap_never_cuts_a_word(smollm2_tokenizer, stop, rollout):
    for cap in range(3, 19):
        g, ids = scripted(smollm2_tokenizer, LONG, type(stop)(stop.kind, stop.regex, cap), cap,
                          rollout)
        assert g.stopped and 1 <= g.num_tokens <= cap
        assert LONG.startswith(g.text)
        rest = LONG[len(g.text):]
        assert g.text[-1:] == " " or rest[:1] == " ", (cap, g.text)  # ends between two words
        assert smollm2_tokenizer.decode(g.token_ids) == g.text  # tokens and text agree
        if rollout:  # the tokens after the word boundary begin the rollout
            assert (g.text + g.rollout).startswith(g.text) and LONG.startswith(g.text + g.rollout)
            assert g.rollout[:1] == " " or g.text[-1:] == " "


def test_a_double_newline_token_keeps_both_newlines(smollm2_tokenizer):
    text = ["12 + 34 = 46", "\n\n", "So the answer is 46.\n"]
    for stop in (newline(48), sentence_end(48)):
        g, ids = scripted(smollm2_tokenizer, text, stop, 48)
        assert g.text == "12 + 34 = 46\n\n"
        assert smollm2_tokenizer.decode(g.token_ids) == g.text  # nothing lost from the text


def test_leading_newlines_are_not_an_empty_option(smollm2_tokenizer):
    for pieces in (["\n\n", "Answer: 46\n"], ["\n", "Step 2: add 4", "\n\n"]):
        for stop in (newline(48), sentence_end(48)):
            g, _ = scripted(smollm2_tokenizer, pieces, stop, 48)
            assert g.text.strip(), (pieces, g.text)  # never a whitespace-only option (dead end)
            assert g.text == "".join(pieces)  # the option runs to the newline after its content
            assert smollm2_tokenizer.decode(g.token_ids) == g.text


def test_one_word_longer_than_the_cap_is_cut_at_the_cap(smollm2_tokenizer):
    g, ids = scripted(smollm2_tokenizer, "123456789012345", token_cap(4), 4)
    assert g.num_tokens == 4 and g.text == smollm2_tokenizer.decode(ids[:4])
