import pytest

from pipeline.config import QstarConfig
from pipeline.decoding.beam import Beam, best_beams, decode_beam, extend
from pipeline.lm.generation import Generation, chat_prompt


def _option(text: str, logprobs: list[float], finished: bool = False) -> Generation:
    return Generation(text=text, token_ids=list(range(len(logprobs))), logprobs=logprobs,
                      finished=finished, stopped=not finished)


def test_extend_adds_up_and_finishes_on_answer_eos_depth_or_length():
    beam = extend(Beam(), _option("Step 1\n", [-1.0, -1.0]), last_step=False, max_tokens=10)
    assert (beam.steps, beam.logprob, beam.tokens, beam.finished) == (["Step 1\n"], -2.0, 2, False)
    assert beam.score == -1.0
    assert extend(beam, _option("Answer: 3\n", [-0.5]), False, 10).finished
    assert extend(beam, _option("so", [-0.5], finished=True), False, 10).finished
    assert extend(beam, _option("more\n", [-0.5]), True, 10).finished
    assert extend(beam, _option("more\n", [-0.5]), False, 3).finished


def test_best_beams_rank_by_normalised_logprob_and_drop_repeats():
    a = Beam(["x\n"], -2.0, 4)  # -0.5 per token
    b = Beam(["y\n"], -1.0, 1)  # -1.0
    c = Beam(["x\n"], -1.0, 4)  # same text as a, better
    d = Beam(["z\n"], -0.9, 3)  # -0.3
    assert best_beams([a, b, c, d], 2) == [c, d]
    assert best_beams([a, b], 5) == [a, b]


@pytest.fixture
def cfg():
    cfg = QstarConfig(seed=3)
    cfg.decode.beam_width, cfg.decode.max_new_tokens, cfg.decode.batch_size = 2, 24, 8
    cfg.search.max_depth, cfg.search.max_option_tokens = 3, 6
    return cfg


def test_decode_beam_gives_one_completion_per_prompt_and_counts_tokens(tiny_model, cfg):
    model, tokenizer = tiny_model
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("1+1?", "What is 7 * 6?")]
    decoded = decode_beam(cfg, model, tokenizer, prompts, progress=None)
    assert len(decoded.completions) == 2 and all(isinstance(c, str) for c in decoded.completions)
    # the first step samples n options per prompt; every step at least one token per option
    assert decoded.tokens >= len(prompts) * cfg.decode.beam_width
    assert decoded.tokens <= len(prompts) * cfg.decode.beam_width ** 2 * cfg.search.max_depth * cfg.search.max_option_tokens
    assert decoded.extra["beam_width"] == 2
    assert decoded.extra["beam_logprob_per_token"] <= 0 and decoded.extra["beam_logprob"] <= 0
    assert decode_beam(cfg, model, tokenizer, prompts, progress=None).completions == decoded.completions
