import math

import pytest
import torch
from tiny import build_tiny_model

from critics.implicit import (
    ImplicitCritic,
    completion_tokens,
    credit_map_html,
    implicit_reward,
    implicit_score,
    option_rewards,
    token_rewards,
)
from pipeline.config import ModelConfig
from pipeline.lm.generation import generate
from pipeline.lm.models import load_model
from pipeline.lm.teacher_forced import completion_logprobs, token_logprobs


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


# ---------------------------------------------------------------- the implicit reward as a critic


def test_implicit_score_is_the_sigmoid_of_the_reward():
    assert implicit_score(0.0) == 0.5
    assert implicit_score(math.log(3)) == pytest.approx(0.75)
    assert implicit_score(-math.log(3)) == pytest.approx(0.25)
    assert implicit_score(-1000.0) == 0.0 and implicit_score(1000.0) == 1.0  # no overflow


def _generated(model, tokenizer, prompts):
    from mcts.options import newline

    return generate(model, tokenizer, prompts, max_new_tokens=12, temperature=1.0,
                    stop=newline(12), seed=3)


def test_token_logprobs_reproduce_the_generation_pass(tiny_model):
    """log pi from generation and from teacher forcing on the same ids agree (padding in play)."""
    model, tokenizer = tiny_model
    prompts = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Q: 7?\n"]
    gens = _generated(model, tokenizer, prompts)
    forced = token_logprobs(model, tokenizer, prompts, [g.token_ids for g in gens])
    for g, got in zip(gens, forced, strict=True):
        assert len(got) == g.num_tokens > 0
        assert got == pytest.approx(g.logprobs, abs=1e-4)


def test_implicit_critic_scores_generated_tokens_against_the_reference(tiny_model, reference):
    policy, tokenizer = tiny_model
    prompts = ["Q: 3 + 4?\n", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    gens = _generated(policy, tokenizer, prompts)
    critic = ImplicitCritic(policy, reference, tokenizer, 0.5, completion_logprobs, token_logprobs)
    got = critic.of_tokens(prompts, [g.token_ids for g in gens], [g.logprobs for g in gens])
    for prompt, g, reward in zip(prompts, gens, got, strict=True):
        text = tokenizer.decode(g.token_ids)
        ref = _by_hand(reference, tokenizer, prompt, text)  # the tiny tokenizer is per character
        assert reward == pytest.approx(0.5 * (sum(g.logprobs) - sum(ref)), abs=1e-4)
    assert any(abs(r) > 1e-3 for r in got)
    itself = ImplicitCritic(policy, policy, tokenizer, 0.5, completion_logprobs, token_logprobs)
    assert itself.of_tokens(prompts, [g.token_ids for g in gens],
                            [g.logprobs for g in gens]) == pytest.approx([0.0, 0.0], abs=1e-4)
    texts = critic.of_texts(prompts, [g.text for g in gens])
    assert texts == pytest.approx([sum(r) for r in implicit_reward(
        policy, reference, tokenizer, prompts, [g.text for g in gens], 0.5, completion_logprobs)])


@pytest.fixture(scope="module")
def smollm2_tiny(tmp_path_factory):
    """SmolLM2's real BPE tokenizer (from the embedded GGUF) on a tiny random Llama."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.lm.models import embedded_gguf

    gguf = embedded_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    policy, ref = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    return policy, ref, tokenizer


def test_real_tokenizer_scores_the_generated_ids_not_a_retokenization(smollm2_tiny):
    policy, ref, tokenizer = smollm2_tiny
    newline, double = (tokenizer("\n", add_special_tokens=False).input_ids,
                       tokenizer("\n\n", add_special_tokens=False).input_ids)
    assert len(newline) == 1 and len(double) == 1  # "\n\n" is one BPE token
    prompt = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("12 + 30 = 42", add_special_tokens=False).input_ids + newline + newline
    # two generated "\n" tokens re-tokenize as one "\n\n": text scoring would see other tokens
    assert len(completion_logprobs(ref, tokenizer, [prompt], [tokenizer.decode(ids)])[0]) == len(ids) - 1
    forced = token_logprobs(ref, tokenizer, [prompt, "Hi\n"], [ids, ids[:2]])
    assert [len(f) for f in forced] == [len(ids), 2]
    gens = generate(policy, tokenizer, [prompt, "Hi\n"], max_new_tokens=10, temperature=1.0, seed=1)
    again = token_logprobs(policy, tokenizer, [prompt, "Hi\n"], [g.token_ids for g in gens])
    for g, got in zip(gens, again, strict=True):
        assert got == pytest.approx(g.logprobs, abs=1e-4)
    critic = ImplicitCritic(policy, ref, tokenizer, 0.1, completion_logprobs, token_logprobs)
    rewards = critic.of_tokens([prompt], [ids], [forced[0]])
    assert rewards == pytest.approx([0.0], abs=1e-5)  # pi = pi_ref on the same tokens
