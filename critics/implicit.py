"""The DPO implicit reward ("From r to Q*"): a DPO policy pi and its reference pi_ref define a
per-token reward beta * (log pi(token) - log pi_ref(token)); summed over an option it is the
option's reward. No training: it needs only the two models' teacher-forced log-probs, which
the caller provides as `logprob_fn(model, tokenizer, prompts, completions) -> per-token lists`
(the pipeline passes pipeline.lm.teacher_forced.completion_logprobs). Both models share a tokenizer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LogprobFn = Callable[..., list[list[float]]]  # (model, tokenizer, prompts, completions)
TokenLogprobFn = Callable[..., list[list[float]]]  # (model, tokenizer, prompts, token_ids)


def token_rewards(policy_logprobs: Sequence[Sequence[float]],
                  reference_logprobs: Sequence[Sequence[float]], beta: float) -> list[list[float]]:
    return [[beta * (p - r) for p, r in zip(pol, ref, strict=True)]
            for pol, ref in zip(policy_logprobs, reference_logprobs, strict=True)]


def implicit_reward(policy, reference, tokenizer, prompts: Sequence[str],
                    completions: Sequence[str], beta: float,
                    logprob_fn: LogprobFn) -> list[list[float]]:
    """Per completion, per token: beta * (log pi - log pi_ref)."""
    return token_rewards(logprob_fn(policy, tokenizer, prompts, completions),
                         logprob_fn(reference, tokenizer, prompts, completions), beta)


def option_rewards(policy, reference, tokenizer, prompt: str, steps: Sequence[str], beta: float,
                   logprob_fn: LogprobFn) -> list[float]:
    """The implicit reward of each option, summed over its tokens, each option after the
    prompt and the options before it (as the search generated it)."""
    prefixes = [prompt + "".join(steps[:k]) for k in range(len(steps))]
    rewards = implicit_reward(policy, reference, tokenizer, prefixes, list(steps), beta, logprob_fn)
    return [sum(r) for r in rewards]


def implicit_score(reward: float) -> float:
    """The reward as a leaf-value part in [0, 1]: sigmoid(reward), DPO's own link (sigmoid of a
    reward difference is the preference probability); 0 reward -> 0.5."""
    if reward >= 0:
        return 1.0 / (1.0 + math.exp(-reward))
    return math.exp(reward) / (1.0 + math.exp(reward))


@dataclass
class ImplicitCritic:
    """A DPO policy's implicit reward as a critic. `policy` is the model DPO trained and
    `reference` the model it trained against (the pipeline reads both from the policy's
    meta.json); all share `tokenizer`."""

    policy: object
    reference: object
    tokenizer: object
    beta: float
    logprob_fn: LogprobFn  # teacher-forced log-probs of completion texts
    token_logprob_fn: TokenLogprobFn  # teacher-forced log-probs of given token ids
    batch_size: int = 16
    # whether `policy` is also the model that generates the tokens of_tokens scores, so the
    # generation pass's log-probs are its own; False when a later training phase (SFT after
    # DPO) made the generating model: then `policy` is teacher-forced over the tokens too
    generates: bool = True

    def of_tokens(self, prompts: Sequence[str], token_ids: Sequence[Sequence[int]],
                  policy_logprobs: Sequence[Sequence[float]]) -> list[float]:
        """Summed reward of tokens the generating model produced after each prompt: log pi_ref
        from one batched teacher-forced forward of the reference; log pi from the generation
        pass (`policy_logprobs`) when `policy` generated them, else from a forward of `policy`."""
        ref = self.token_logprob_fn(self.reference, self.tokenizer, prompts, token_ids,
                                    self.batch_size)
        if not self.generates:
            policy_logprobs = self.token_logprob_fn(self.policy, self.tokenizer, prompts,
                                                    token_ids, self.batch_size)
        return [self.beta * (sum(pol) - sum(r)) for pol, r in zip(policy_logprobs, ref, strict=True)]

    def of_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Summed reward of completion texts (both models teacher-forced)."""
        return [sum(r) for r in implicit_reward(self.policy, self.reference, self.tokenizer,
                                                prompts, completions, self.beta, self._texts)]

    def _texts(self, model, tokenizer, prompts, completions) -> list[list[float]]:
        return self.logprob_fn(model, tokenizer, prompts, completions, self.batch_size)


def completion_tokens(tokenizer, completion: str) -> list[str]:
    """The completion's tokens as text, aligned with its per-token log-probs."""
    ids = tokenizer(completion, add_special_tokens=False).input_ids
    return [tokenizer.decode([i]) for i in ids]


def _colour(reward: float, scale: float) -> str:
    alpha = min(abs(reward) / scale, 1.0) if scale > 0 else 0.0
    rgb = "0, 160, 0" if reward > 0 else "220, 0, 0"
    return f"rgba({rgb}, {alpha:.3f})"


def credit_map_html(tokens: Sequence[str], rewards: Sequence[float], title: str) -> str:
    """A standalone HTML page: each token on a background green for positive reward, red for
    negative, stronger with |reward| (scaled to the largest |reward|); hover shows the value."""
    if len(tokens) != len(rewards):
        raise ValueError(f"{len(tokens)} tokens but {len(rewards)} rewards")
    scale = max((abs(r) for r in rewards), default=0.0)
    spans = "".join(
        f'<span title="{r:+.4f}" style="background: {_colour(r, scale)}">{html.escape(t)}</span>'
        for t, r in zip(tokens, rewards, strict=True))
    legend = (f'<p class="legend"><span style="background: {_colour(scale, scale)}">positive</span> '
              f'<span style="background: {_colour(-scale, scale)}">negative</span> '
              f"beta * log(pi / pi_ref) per token; full colour = |r| of {scale:.4f}; "
              f"total {sum(rewards):+.4f}</p>")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif} .tokens{font-family:monospace;"
            "white-space:pre-wrap;line-height:1.6}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{legend}\n"
            f'<div class="tokens">{spans}</div>\n</body></html>\n')
