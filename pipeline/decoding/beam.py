"""decode=beam: step-level beam search over the policy's own likelihood.

"From r to Q*": a DPO policy's log-likelihood equals its implicit reward up to the reference's
log-likelihood, so likelihood search on a DPO policy is close to reward-guided search, and with
many beams it over-optimises that reward. Each step samples options (lines) from every live
beam, ranks all candidates by length-normalised log-prob, and keeps the best `decode.beam_width`. The
mean log-prob of the chosen beams goes into the result, to show that over-optimisation as the
beam count grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mcts.options import is_answer_line, newline
from pipeline.config import QstarConfig
from pipeline.decoding.base import Decoded
from pipeline.lm.generation import Generation, generate
from pipeline.run.progress import progress_bar


@dataclass
class Beam:
    steps: list[str] = field(default_factory=list)
    logprob: float = 0.0  # summed token log-probs of every step
    tokens: int = 0
    finished: bool = False

    @property
    def text(self) -> str:
        return "".join(self.steps)

    @property
    def score(self) -> float:
        """Length-normalised log-prob: longer beams are not penalised for their length."""
        return self.logprob / max(self.tokens, 1)


def extend(beam: Beam, option: Generation, last_step: bool, max_tokens: int) -> Beam:
    tokens = beam.tokens + option.num_tokens
    done = (option.finished or is_answer_line(option.text) or last_step or tokens >= max_tokens
            or option.num_tokens == 0)
    return Beam(beam.steps + [option.text], beam.logprob + option.logprob, tokens, done)


def best_beams(candidates: list[Beam], width: int) -> list[Beam]:
    """The `width` best by score, one per distinct text (samples often repeat a line)."""
    kept, seen = [], set()
    for beam in sorted(candidates, key=lambda b: b.score, reverse=True):
        if beam.text not in seen:
            seen.add(beam.text)
            kept.append(beam)
    return kept[:width]


def decode_beam(cfg: QstarConfig, model, tokenizer, prompts: list[str], progress: str | None):
    """One completion per prompt: its best finished beam. Counts every sampled token."""
    d, s = cfg.decode, cfg.search
    stop = newline(s.max_option_tokens)
    beams = [[Beam()] for _ in prompts]
    tokens = 0
    for depth in progress_bar(range(s.max_depth), desc=progress, unit="step"):
        live = [(i, beam) for i, group in enumerate(beams) for beam in group if not beam.finished]
        if not live:
            break
        options = generate(model, tokenizer, [prompts[i] + beam.text for i, beam in live for _ in range(d.beam_width)],
                           max_new_tokens=s.max_option_tokens, temperature=d.temperature,
                           top_p=d.top_p, stop=stop, batch_size=d.batch_size,
                           seed=cfg.seed + 100_003 * depth)
        tokens += sum(o.num_tokens for o in options)
        candidates = [[beam for beam in group if beam.finished] for group in beams]
        for k, option in enumerate(options):
            i, beam = live[k // d.beam_width]
            candidates[i].append(extend(beam, option, depth + 1 >= s.max_depth, d.max_new_tokens))
        beams = [best_beams(group, d.beam_width) for group in candidates]
    chosen = [max(group, key=lambda b: (b.finished, b.score)) for group in beams]
    return Decoded([b.text for b in chosen], tokens, extra={
        "beam_width": d.beam_width,
        "beam_logprob_per_token": sum(b.score for b in chosen) / max(len(chosen), 1),
        "beam_logprob": sum(b.logprob for b in chosen) / max(len(chosen), 1),
    })
