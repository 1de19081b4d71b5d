"""pipeline.lm.generation: batched greedy/sampled generation, stop rules, fused rollouts.

The session tiny model (tied embeddings) mostly repeats its last token, so greedy output from a
chat prompt is a run of newlines. The `varied` model below (untied, wider init) gives greedy
continuations that differ per prompt and contain newlines, sentence ends and EOS, which is what
the padding, stop-rule and rollout checks need.
"""

import re

import pytest
import torch

from mcts.options import newline, sentence_end, step_marker, token_cap
from pipeline.config import ModelConfig
from pipeline.lm.generation import (
    chat_prompt,
    eos_token_ids,
    generate,
    newline_token_ids,
    replayed,
    streaming_decoder,
)
from pipeline.lm.models import load_model
from pipeline.lm.teacher_forced import completion_logprobs

QUESTIONS = [
    "What is 2+3?",
    "Hi",
    "A much longer question about many things 12345",
    "Compute 17*3 then add 4.",
    "x",
    "Name three prime numbers below twenty, then sum them.",
]



@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """A 2-layer random Llama whose greedy text varies by prompt (untied head, init 0.3)."""
    from tiny import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, initializer_range=0.3,
    )
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("varied") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(ModelConfig(name=str(path)))


def prompts_for(tokenizer, questions=QUESTIONS):
    return [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def plain_greedy(model, tokenizer, prompt, max_new_tokens):
    """`model.generate` greedy on one prompt: new ids through the first EOS."""
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    eos = eos_token_ids(model, tokenizer)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos.tolist(),
                         temperature=None, top_p=None, top_k=None)
    ids = out[0, enc.input_ids.shape[1]:].tolist()
    for k, token in enumerate(ids):
        if token in eos.tolist():
            return ids[:k + 1]
    return ids


def raw_text(tokenizer, ids):
    """Text that re-tokenizes to exactly `ids` (special tokens kept) with the char tokenizer."""
    return tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- greedy


def test_greedy_matches_plain_generate_and_is_batch_invariant(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding
    batched = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=8)
    again = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=8)
    pairs = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=2)
    singles = [generate(model, tokenizer, [p], max_new_tokens=30)[0] for p in prompts]
    texts = set()
    for prompt, b, a, p2, s in zip(prompts, batched, again, pairs, singles):
        expected = plain_greedy(model, tokenizer, prompt, 30)
        assert b.token_ids == expected
        assert a.token_ids == expected and p2.token_ids == expected and s.token_ids == expected
        assert b.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert b.num_tokens == len(expected) == len(b.logprobs)
        texts.add(b.text)
    assert len(texts) > 1  # the check is not vacuous: rows differ


def test_greedy_logprobs_equal_teacher_forced(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    gens = generate(model, tokenizer, prompts, max_new_tokens=25)
    forced = completion_logprobs(model, tokenizer, prompts,
                                 [raw_text(tokenizer, g.token_ids) for g in gens])
    for g, f in zip(gens, forced):
        assert len(f) == len(g.logprobs) == g.num_tokens
        assert g.logprobs == pytest.approx(f, abs=1e-4)
        assert g.logprob == pytest.approx(sum(f), abs=1e-3)
        assert all(lp <= 0 for lp in g.logprobs)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 1.0)])
def test_sampled_logprobs_are_unwarped_teacher_forced(tiny_model, temperature, top_p):
    model, tokenizer = tiny_model
    prompts = prompts_for(tokenizer)
    gens = generate(model, tokenizer, prompts, max_new_tokens=20, temperature=temperature,
                    top_p=top_p, seed=3)
    forced = completion_logprobs(model, tokenizer, prompts,
                                 [raw_text(tokenizer, g.token_ids) for g in gens])
    for g, f in zip(gens, forced):
        assert len(g.logprobs) == g.num_tokens == len(f) > 0
        assert g.logprobs == pytest.approx(f, abs=1e-4)


# ---------------------------------------------------------------- stop rules and caps


def test_newline_rule_ends_each_row_at_first_newline(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    nl = tokenizer.convert_tokens_to_ids("\n")
    full = generate(model, tokenizer, prompts, max_new_tokens=40)
    cut = generate(model, tokenizer, prompts, max_new_tokens=40, stop=newline(40))
    stopped_at_newline = 0
    for f, c in zip(full, cut):
        if nl in f.token_ids:
            k = f.token_ids.index(nl)
            assert c.token_ids == f.token_ids[:k + 1]
            assert c.stopped and not c.finished
            assert c.text.endswith("\n") and c.text.count("\n") == 1
            assert c.logprobs == pytest.approx(f.logprobs[:k + 1], abs=1e-5)
            stopped_at_newline += 1
        else:
            assert c.token_ids == f.token_ids  # nothing to stop at: same as without a rule
            assert "\n" not in c.text
    assert stopped_at_newline >= 1


def test_newline_rule_with_sampling(tiny_model):
    model, tokenizer = tiny_model
    prompts = prompts_for(tokenizer) * 4
    cap = 50
    nl = tokenizer.convert_tokens_to_ids("\n")
    gens = generate(model, tokenizer, prompts, max_new_tokens=cap, temperature=1.0, seed=0,
                    stop=newline(cap))
    newline_rows = 0
    for g in gens:
        body = g.token_ids[:-1]
        while body and body[0] == nl:  # leading newlines are not an option boundary
            body = body[1:]
        assert nl not in body  # never runs past its first newline after content
        assert g.num_tokens <= cap
        if g.stopped and g.token_ids[-1] == nl:
            assert g.text.endswith("\n") and g.text.strip() and "\n" not in g.text.strip()
            newline_rows += 1
        elif g.stopped:  # the option cap, backed off to the last word boundary
            assert "\n" not in g.text.strip() and g.num_tokens <= cap
            assert g.num_tokens == cap or g.text[-1:].isspace() or " " in g.text
        else:
            assert g.finished
    assert newline_rows >= 1


def _sentence_cut(text):
    m = re.search(r"[.!?]\s|\n", text)
    return None if m is None else text[:m.end()]


def _marker_cut(text, regex):
    lead = len(text) - len(text.lstrip())
    for m in re.finditer(regex, text):
        if m.start() > lead:
            return text[:m.start()]
    return None


def test_sentence_end_rule_through_decode_path(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    cap = 40
    rule = sentence_end(cap)
    assert rule.kind != "newline"  # the decoding path, not the newline token fast path
    full = generate(model, tokenizer, prompts, max_new_tokens=cap)
    cut = generate(model, tokenizer, prompts, max_new_tokens=cap, stop=rule)
    by_rule = 0
    for f, c in zip(full, cut):
        expected = _sentence_cut(f.text)
        if expected is not None:
            assert c.text == expected and c.stopped
            assert c.num_tokens == len(expected)  # one token per char, stops on the boundary
            by_rule += 1
        else:
            assert c.text == f.text
    assert by_rule >= 1


@pytest.mark.parametrize("regex", [r"Step \d+:", r"[0-9]", r"[A-Z]"])
def test_step_marker_rule_through_decode_path(varied, regex):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    cap = 40
    full = generate(model, tokenizer, prompts, max_new_tokens=cap)
    cut = generate(model, tokenizer, prompts, max_new_tokens=cap, stop=step_marker(regex, cap))
    for f, c in zip(full, cut):
        expected = _marker_cut(f.text, regex)
        if expected is None:  # the cap: the text up to its last word boundary
            assert f.text.startswith(c.text) and c.text.strip()
            continue
        assert c.stopped and c.text == expected
        # the row stopped as soon as the next marker was complete; its tokens are kept
        kept = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert kept.startswith(expected) and re.fullmatch(regex, kept[len(expected):])
    if regex != r"Step \d+:":  # the random model never writes "Step 1:"
        assert any(c.stopped and c.num_tokens < cap for c in cut)


@pytest.mark.parametrize("cap", [1, 3, 7])
def test_option_cap_respected(tiny_model, varied, cap):
    for model, tokenizer in (tiny_model, varied):
        prompts = prompts_for(tokenizer)
        for stop in (None, newline(cap), token_cap(cap), sentence_end(cap)):
            for temperature in (0.0, 1.0):
                gens = generate(model, tokenizer, prompts, max_new_tokens=cap, stop=stop,
                                temperature=temperature, seed=0)
                for g in gens:
                    assert 1 <= g.num_tokens <= cap
                    if not g.finished and not g.stopped:
                        assert g.num_tokens == cap
                if stop is not None and stop.kind == "token_cap":
                    assert all(g.finished or g.stopped for g in gens)


# ---------------------------------------------------------------- fused rollouts


@pytest.mark.parametrize("rule", [newline(6), token_cap(4), sentence_end(6)])
def test_rollout_equals_separate_greedy_continuation(varied, rule):
    """After the boundary the rollout is greedy. Where the cap cut the option back to a word's
    start, the tokens already sampled past the cut open the rollout (the char tokenizer: one
    character each) and the greedy continuation follows them."""
    model, tokenizer = varied
    prompts = prompts_for(tokenizer) * 2
    cap, rollout = rule.max_tokens, 12
    gens = generate(model, tokenizer, prompts, max_new_tokens=cap, temperature=1.0, seed=5,
                    stop=rule, rollout_tokens=rollout)
    with_rollout = cut_back = 0
    for prompt, g in zip(prompts, gens):
        assert g.num_tokens <= cap
        if not g.stopped:
            assert g.rollout == "" and g.rollout_tokens == 0
            continue
        option_ids = tokenizer(g.text, add_special_tokens=False).input_ids
        assert g.token_ids == option_ids  # for these rules the option is its tokens
        at_boundary = rule.kind != "token_cap" and rule.ends(g.text)
        sampled = 0 if at_boundary else cap - g.num_tokens  # drawn past the cut, before the cap
        cut_back += sampled > 0
        separate = generate(model, tokenizer, [prompt + g.text + g.rollout[:sampled]],
                            max_new_tokens=rollout - sampled)[0]
        assert g.rollout == g.rollout[:sampled] + separate.text
        assert g.rollout_tokens == sampled + separate.num_tokens
        assert g.rollout_logprobs[sampled:] == pytest.approx(separate.logprobs, abs=1e-4)
        assert g.rollout_finished == separate.finished
        assert not g.finished
        with_rollout += 1
    assert with_rollout >= 2
    if rule.kind == "token_cap":
        assert cut_back >= 1  # the case above is exercised


def test_sampled_rollout_continues_the_rows_own_sample(varied):
    """At rollout_temperature == temperature a fused row is one sample: option + rollout are the
    first tokens a plain sampled row with the same seed draws (one uniform per step either way)."""
    model, tokenizer = varied
    prompts = prompts_for(tokenizer) * 2
    seeds = list(range(100, 100 + len(prompts)))
    cap, rollout = 6, 12
    gens = generate(model, tokenizer, prompts, max_new_tokens=cap, temperature=1.0, seeds=seeds,
                    stop=newline(cap), rollout_tokens=rollout, rollout_temperature=1.0)
    plain = generate(model, tokenizer, prompts, max_new_tokens=cap + rollout, temperature=1.0,
                     seeds=seeds)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=cap, temperature=1.0, seeds=seeds,
                      stop=newline(cap), rollout_tokens=rollout)
    rolled = 0
    for g, p, q in zip(gens, plain, greedy):
        assert g.token_ids == q.token_ids  # the option is drawn as before
        n = g.num_tokens + g.rollout_tokens
        assert g.logprobs + (g.rollout_logprobs or []) == pytest.approx(p.logprobs[:n], abs=1e-4)
        assert p.text.startswith(g.text + g.rollout)
        rolled += g.rollout_tokens > 0
    assert rolled >= 2
    assert any(g.rollout != q.rollout for g, q in zip(gens, greedy))  # not the greedy finish


def test_sampled_rollout_does_not_depend_on_the_batch(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    seeds = [7, 8, 9, 10, 11, 12]
    kwargs = dict(max_new_tokens=6, temperature=1.0, stop=newline(6), rollout_tokens=10,
                  rollout_temperature=0.5)
    together = generate(model, tokenizer, prompts, seeds=seeds, **kwargs)
    alone = [generate(model, tokenizer, [p], seeds=[s], **kwargs)[0] for p, s in zip(prompts, seeds)]
    assert [(g.text, g.rollout) for g in together] == [(g.text, g.rollout) for g in alone]
    other = generate(model, tokenizer, prompts, seeds=[s + 50 for s in seeds], **kwargs)
    assert [g.text + g.rollout for g in other] != [g.text + g.rollout for g in together]


def test_final_ends_rollout(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer) * 2
    kwargs = dict(max_new_tokens=6, temperature=1.0, seed=5, stop=newline(6), rollout_tokens=10)
    plain = generate(model, tokenizer, prompts, **kwargs)
    texts = sorted({g.text for g in plain if g.stopped})
    assert len(texts) >= 2
    answers = set(texts[::2])  # options that "end the solution"
    seen = []

    def final(text):
        seen.append(text)
        return text in answers

    gens = generate(model, tokenizer, prompts, final=final, **kwargs)
    assert [g.token_ids for g in gens] == [g.token_ids for g in plain]  # options unchanged
    stopped = [g for g in gens if g.stopped]
    assert sorted(seen) == sorted(g.text for g in stopped)  # asked once per option, on its text
    for g, p in zip(gens, plain):
        if not g.stopped:
            continue
        if g.text in answers:
            assert g.rollout == "" and g.rollout_tokens == 0 and not g.rollout_finished
        else:
            assert g.rollout_tokens > 0
            assert (g.rollout, g.rollout_logprobs) == (p.rollout, p.rollout_logprobs)
    every = generate(model, tokenizer, prompts, final=lambda text: True, **kwargs)
    assert all(g.rollout_tokens == 0 and g.rollout == "" for g in every)
    assert [g.token_ids for g in every] == [g.token_ids for g in plain]


def test_rollout_needs_stop_rule(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="stop rule"):
        generate(model, tokenizer, prompts_for(tokenizer)[:1], max_new_tokens=4, rollout_tokens=3)


# ---------------------------------------------------------------- EOS, seeds, newline ids


def test_eos_sets_finished(tiny_model, varied):
    eos = tiny_model[1].eos_token_id
    finished = 0
    for (model, tokenizer), temperature in ((varied, 0.0), (tiny_model, 1.0)):
        gens = generate(model, tokenizer, prompts_for(tokenizer) * 3, max_new_tokens=60,
                        temperature=temperature, seed=2)
        for g in gens:
            if eos in g.token_ids:
                assert g.token_ids.index(eos) == g.num_tokens - 1  # nothing after EOS
                assert g.finished and "<|im_end|>" not in g.text
                finished += 1
            else:
                assert not g.finished and g.num_tokens == 60
    assert finished >= 2


def test_eos_from_generation_config_sets_finished(tiny_model, monkeypatch):
    """Greedy text of the tied tiny model starts with a newline: declare it an EOS id."""
    model, tokenizer = tiny_model
    nl = tokenizer.convert_tokens_to_ids("\n")
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, nl])
    gens = generate(model, tokenizer, prompts_for(tokenizer)[:3], max_new_tokens=10)
    for g in gens:
        assert g.token_ids == [nl] and g.finished and g.num_tokens == 1


def test_seeds_reproducible_and_distinct(tiny_model):
    model, tokenizer = tiny_model
    prompts = prompts_for(tokenizer)[:4]

    def run(seed):
        gens = generate(model, tokenizer, prompts, max_new_tokens=16, temperature=1.0, seed=seed)
        return [g.token_ids for g in gens]

    a, b, c = run(11), run(11), run(12)
    assert a == b
    assert a != c
    assert sum(x != y for x, y in zip(a, c)) >= 2


def test_per_row_seeds_make_samples_independent_of_batching(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    seeds = [101, 7, 101, 55, 3, 9]

    def run(rows, batch_size):
        gens = generate(model, tokenizer, [prompts[i] for i in rows], max_new_tokens=12,
                        temperature=1.0, stop=newline(12), seeds=[seeds[i] for i in rows],
                        batch_size=batch_size)
        return {i: g.token_ids for i, g in zip(rows, gens)}

    together = run(range(6), 32)
    for i in range(6):
        assert run([i], 1)[i] == together[i]  # alone = batched with the others
    assert run([4, 1, 0], 2) == {i: together[i] for i in (4, 1, 0)}  # order, batch size
    assert together[0] != together[1]
    with pytest.raises(ValueError, match="seeds"):
        generate(model, tokenizer, prompts, max_new_tokens=2, seeds=[1])


def test_rows_submitted_while_others_decode_come_out_as_alone(varied):
    """The streaming Decoder: rows submitted mid-decoding join the running batch, each row's
    tokens and log-probs are those `generate` gives it, and a finished row is handed back once."""
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    seeds = [101, 7, 13, 55, 3, 9]
    kwargs = dict(max_new_tokens=12, temperature=1.0, stop=newline(12), rollout_tokens=6,
                  rollout_temperature=1.0)
    want = generate(model, tokenizer, prompts, seeds=seeds, batch_size=32, **kwargs)
    decoder = streaming_decoder(model, tokenizer, **kwargs)
    first = decoder.submit(prompts[:3], seeds[:3])
    finished = decoder.advance(2)  # two rows decode, the third waits
    assert finished and decoder.busy
    later = decoder.submit(prompts[3:], seeds[3:])
    while decoder.busy:
        finished += decoder.advance(2)
    assert sorted(finished) == first + later  # every row once
    got = [decoder.take(r) for r in first + later]
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.rollout for g in got] == [g.rollout for g in want]
    for mine, theirs in zip(got, want):
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-5)
    assert decoder.rows[first[0]] is None  # taken rows are forgotten


@pytest.fixture(scope="module")
def varied_smollm2(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama over SmolLM2's real tokenizer (BPE: "\\n\\n" is one token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("varied_smollm2") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(ModelConfig(name=str(path)))


@pytest.mark.parametrize("which", ["varied", "varied_smollm2"])
def test_a_repeated_option_stops_at_its_boundary(request, which):
    """With `claims`, a row whose option repeats, token for token, an earlier row's of its
    group stops at its boundary (cut, no rollout decoded past it); every other row comes out
    exactly as without claims, and rows of other groups are never cut."""
    from pipeline.lm.stopping import OptionClaims

    model, tokenizer = request.getfixturevalue(which)
    p = prompts_for(tokenizer, QUESTIONS[:2])
    prompts = [p[0]] * 4 + [p[1], p[0], p[0]]
    groups = ["a"] * 4 + ["a", "b", "b"]  # "b"'s rows repeat "a"'s, but in another group
    seeds = [5, 5, 6, 5, 5, 5, 5]
    kwargs = dict(max_new_tokens=8, temperature=1.0, stop=newline(8), rollout_tokens=12,
                  rollout_temperature=1.0, seeds=seeds, batch_size=3)
    plain = generate(model, tokenizer, prompts, **kwargs)
    claims = OptionClaims()
    got = generate(model, tokenizer, prompts, groups=groups, claims=claims, **kwargs)
    repeats = [any(groups[j] == groups[i] and plain[j].token_ids == plain[i].token_ids
                   for j in range(i)) for i in range(len(prompts))]
    assert repeats[1] and repeats[3] and repeats[6] and not repeats[5]
    for i, (mine, theirs) in enumerate(zip(got, plain)):
        assert mine.token_ids == theirs.token_ids and mine.text == theirs.text
        if not repeats[i]:
            assert not mine.cut and mine.rollout == theirs.rollout
            assert mine.rollout_logprobs == pytest.approx(theirs.rollout_logprobs, abs=1e-5)
        elif theirs.rollout_tokens:  # a repeat that would have rolled out is cut at its boundary
            assert mine.cut and mine.stopped and mine.rollout_tokens < theirs.rollout_tokens
            assert theirs.rollout.startswith(mine.rollout)  # what it did decode (after a cap)
    assert any(g.cut for g in got)
    assert not any(g.cut for g in generate(model, tokenizer, prompts, groups=groups, **kwargs))


REPLAYED = ("text", "token_ids", "logprobs", "finished", "stopped", "rollout", "rollout_ids",
            "rollout_logprobs", "rollout_finished")


@pytest.mark.parametrize("rule", ["newline", "sentence"])
@pytest.mark.parametrize("which", ["varied", "varied_smollm2"])
def test_replaying_a_rows_tokens_ends_it_where_decoding_did(request, which, rule):
    """`replayed`: the tokens a row decoded (option, then rollout) run through the same rule,
    without the model, end as the row did: the same option, boundary, rollout and flags. And a
    row's rollout replayed alone splits into an option and its rollout that join back into it
    (search.reuse_rollouts reads a node's first option off the node's rollout so)."""
    model, tokenizer = request.getfixturevalue(which)
    prompts = prompts_for(tokenizer) * 3
    stop = newline(6) if rule == "newline" else sentence_end(6)
    kwargs = dict(max_new_tokens=6, stop=stop, rollout_tokens=24, rollout_temperature=1.0)
    gens = generate(model, tokenizer, prompts, temperature=1.0, seeds=range(len(prompts)),
                    batch_size=4, **kwargs)
    assert any(g.stopped and g.rollout_tokens for g in gens)
    split = 0
    for g in gens:
        again = replayed(model, tokenizer, g.token_ids + g.rollout_ids,
                         g.logprobs + g.rollout_logprobs, **kwargs)
        assert again.replayed and not g.replayed
        assert {k: getattr(again, k) for k in REPLAYED} == {k: getattr(g, k) for k in REPLAYED}
        first = replayed(model, tokenizer, g.rollout_ids, g.rollout_logprobs, **kwargs)
        if first.stopped:
            split += 1
            assert first.text + first.rollout == g.rollout
            assert first.token_ids + first.rollout_ids == g.rollout_ids
            # its first boundary, or the option cap where it reaches none
            assert first.text == stop.cut(g.rollout) if stop.ends(first.text) else first.num_tokens <= 6
    assert split


def test_option_claims_order_rows_by_call_then_row():
    """A later call's rows (a later epoch) come after an earlier call's; within a call the lower
    row id is first even when it claims later; groups and options are claimed apart."""
    from pipeline.lm.stopping import OptionClaims

    claims = OptionClaims()
    first, later = claims.epoch(), claims.epoch()
    assert claims.claim("node", (1, 2), (first, 5))
    assert not claims.claim("node", (1, 2), (later, 0))  # a retry repeating the first call's row
    assert claims.claim("node", (1, 2), (first, 3))  # an earlier row of the first call: it is first
    assert not claims.claim("node", (1, 2), (first, 5))  # so row 5 is now the repeat
    assert claims.claim("other node", (1, 2), (later, 0)) and claims.claim("node", (1, 3), (later, 0))


def test_newline_token_ids(tiny_model):
    _, tokenizer = tiny_model
    ids = newline_token_ids(tokenizer).tolist()
    assert tokenizer.convert_tokens_to_ids("\n") in ids
    for i in ids:
        assert "\n" in tokenizer.decode([i])
    for ch in "a1 .\t":
        assert tokenizer.convert_tokens_to_ids(ch) not in ids


def _char_tokenizer(shift: int):
    """A char-level tokenizer whose "\\n" id depends on `shift`."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    chars = chars[shift:] + chars[:shift]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<unk>"] + chars)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def test_newline_token_ids_not_stale_for_a_new_tokenizer(monkeypatch):
    """Regression: a cache keyed by id(tokenizer) handed a new tokenizer, which CPython often
    puts at a freed tokenizer's address, the dead one's newline ids. Address reuse is
    simulated deterministically by making every `id()` in pipeline.lm.generation collide."""
    import pipeline.lm.generation as generation

    monkeypatch.setattr(generation, "id", lambda obj: 1, raising=False)
    for shift in (0, 7, 30):
        tokenizer = _char_tokenizer(shift)
        ids = newline_token_ids(tokenizer).tolist()
        assert ids == [tokenizer.convert_tokens_to_ids("\n")], shift
