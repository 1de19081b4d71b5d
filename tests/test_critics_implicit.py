import pytest
import torch
from tiny import build_tiny_model

from critics.implicit import (
    completion_tokens,
    credit_map_html,
    implicit_reward,
    option_rewards,
    token_rewards,
)
from pipeline.config import ModelConfig
from pipeline.lm.generation import completion_logprobs
from pipeline.lm.models import load_model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model, _ = load_model(ModelConfig(name=str(build_tiny_model(tmp_path_factory.mktemp("ref") / "m", seed=1))))
    return model


@torch.no_grad()
def _by_hand(model, tokenizer, prompt: str, completion: str) -> list[float]:
    """log p(token) of each completion token, from one unpadded forward pass."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids
    logits = model(input_ids=torch.tensor([p + c])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[len(p) + k - 1, tok]) for k, tok in enumerate(c)]


def test_implicit_reward_is_beta_times_the_logprob_difference(tiny_model, reference):
    policy, tokenizer = tiny_model
    prompts = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Q: 7?\n"]
    completions = ["2 + 2 = 4\nAnswer: 4\n", "Answer: 7"]  # different lengths: padding in play
    rewards = implicit_reward(policy, reference, tokenizer, prompts, completions, 0.1,
                              completion_logprobs)
    for prompt, completion, got in zip(prompts, completions, rewards, strict=True):
        pi = _by_hand(policy, tokenizer, prompt, completion)
        ref = _by_hand(reference, tokenizer, prompt, completion)
        expected = [0.1 * (a - b) for a, b in zip(pi, ref, strict=True)]
        assert got == pytest.approx(expected, abs=1e-5)
        assert any(abs(r) > 1e-3 for r in got)  # the two random models do differ
        assert len(completion_tokens(tokenizer, completion)) == len(got)


def test_a_model_against_itself_has_zero_reward(tiny_model):
    model, tokenizer = tiny_model
    rewards = implicit_reward(model, model, tokenizer, ["Q\n"], ["A: 1\n"], 0.5, completion_logprobs)
    assert rewards == [[0.0] * 5]


def test_option_rewards_sum_each_option_after_its_prefix(tiny_model, reference):
    policy, tokenizer = tiny_model
    prompt, steps = "Q: 3 + 4?\n", ["3 + 4 = 7\n", "Answer: 7\n"]
    got = option_rewards(policy, reference, tokenizer, prompt, steps, 0.2, completion_logprobs)
    second = implicit_reward(policy, reference, tokenizer, [prompt + steps[0]], [steps[1]], 0.2,
                             completion_logprobs)[0]
    assert len(got) == 2 and got[1] == pytest.approx(sum(second), abs=1e-6)


def test_token_rewards_by_hand():
    assert token_rewards([[-1.0, -2.0]], [[-1.5, -1.0]], 2.0) == [[1.0, -2.0]]
    with pytest.raises(ValueError):
        token_rewards([[-1.0]], [[-1.0, -2.0]], 1.0)


def test_credit_map_escapes_text_and_colours_signs():
    page = credit_map_html(["<b>", " & ", "ok\n"], [0.5, -0.25, 0.0], "x < y")
    assert "<b>" not in page and "&lt;b&gt;" in page and " &amp; " in page
    assert "<title>x &lt; y</title>" in page
    assert 'title="+0.5000" style="background: rgba(0, 160, 0, 1.000)"' in page  # green, full
    assert 'title="-0.2500" style="background: rgba(220, 0, 0, 0.500)"' in page  # red, half
    assert "rgba(220, 0, 0, 0.000)" in page  # zero reward: no colour
    assert "positive" in page and "negative" in page and "total +0.2500" in page
    with pytest.raises(ValueError, match="2 tokens but 1 rewards"):
        credit_map_html(["a", "b"], [1.0], "t")
