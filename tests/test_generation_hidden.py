"""generate(hidden=True): the decoding pass's own final hidden states, the critics' features
without a second forward. The tokens must not change, and each hidden state must be what a
teacher-forced pass over the same token ids computes at that position."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures

from mcts.options import newline
from pipeline.lm.generation import generate
from pipeline.lm.prefix_cache import PrefixCache


def teacher_forced_hidden(model, tokenizer, prompt: str, new_ids: list[int]) -> torch.Tensor:
    """The final hidden state at the last of prompt + new_ids, one row, no cache."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids + list(new_ids)
    with torch.no_grad():
        out = model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.last_hidden_state[0, -1].float()


CASES = [
    dict(temperature=0.0, rollout_tokens=5, cache=False),
    dict(temperature=1.0, rollout_tokens=5, cache=True),
    dict(temperature=1.0, rollout_tokens=0, cache=True),
]


@pytest.mark.parametrize("case", CASES, ids=["greedy-rollout", "sampled-rollout-cache",
                                             "sampled-no-rollout-cache"])
@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_hidden_states_leave_the_tokens_alone_and_match_a_teacher_forced_pass(case, which, request):
    model, tokenizer = request.getfixturevalue(which)
    prompts = [p for p in prompts_for(tokenizer)[:4] for _ in range(2)]  # shared prefills too
    kwargs = dict(max_new_tokens=8, temperature=case["temperature"], stop=newline(8),
                  rollout_tokens=case["rollout_tokens"], seeds=list(range(len(prompts))),
                  batch_size=8)
    plain = generate(model, tokenizer, prompts, **kwargs,
                     prefix_cache=PrefixCache(64) if case["cache"] else None)
    seen = generate(model, tokenizer, prompts, **kwargs, hidden=True,
                    prefix_cache=PrefixCache(64) if case["cache"] else None)
    for a, b in zip(plain, seen, strict=True):
        assert (a.token_ids, a.text, a.rollout, a.finished) == (b.token_ids, b.text, b.rollout,
                                                                 b.finished)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert a.option_hidden is None and a.end_hidden is None and a.prompt_hidden is None
    rollouts = finished = 0
    for prompt, g in zip(prompts, seen):
        rollout_ids = tokenizer(g.rollout, add_special_tokens=False).input_ids if g.rollout else []
        rollouts += bool(g.rollout_tokens)
        finished += g.finished or g.rollout_finished
        assert g.prompt_hidden == pytest.approx(teacher_forced_hidden(model, tokenizer, prompt, []),
                                                abs=1e-4)
        option = g.token_ids[:-1] if g.finished else g.token_ids  # a final EOS is no text
        assert g.option_hidden == pytest.approx(
            teacher_forced_hidden(model, tokenizer, prompt, option), abs=1e-4)
        end = g.token_ids + (rollout_ids if g.rollout_tokens else [])
        if g.rollout_tokens and len(rollout_ids) != g.rollout_tokens - g.rollout_finished:
            continue  # the rollout text re-tokenizes differently (a BPE seam): compare no ids
        if g.finished and not g.rollout_tokens:
            end = option
        assert g.end_hidden == pytest.approx(teacher_forced_hidden(model, tokenizer, prompt, end),
                                             abs=1e-4)
    if case["rollout_tokens"]:
        assert rollouts > 0  # the option's and the row's end differ somewhere
