"""`qstar inspect RUN --iter N --problem ID --credit`: the per-token implicit reward
beta * log(pi_{N+1} / pi_N) of the problem's best trajectory, as a coloured HTML map
(the "From r to Q*" figure 1): which tokens DPO credited and which it blamed."""

from __future__ import annotations

from pathlib import Path

from critics.implicit import completion_tokens, credit_map_html, implicit_reward
from pipeline.config import ModelConfig, replace_model_name
from pipeline.errors import QstarError
from pipeline.lm.generation import completion_logprobs
from pipeline.lm.models import load_model, resolve_model_path
from pipeline.run.atomic import write_text
from pipeline.run.store import RunStore


def write_credit_map(store: RunStore, iteration: int, row: dict, out: Path) -> Path:
    train = store.metrics(iteration, "train")
    if train is None or train.get("skipped"):
        raise QstarError(f"iteration {iteration} has no trained policy: the credit map compares "
                         "policy_{N+1} with its reference policy_N")
    config = store.manifest["config"]
    model_cfg = ModelConfig(**{k: config["model"][k] for k in ("dtype", "device", "cache_dir")},
                            name=config["model"]["name"])
    reference_dir = store.policy_dir(iteration, resolve_model_path(model_cfg))
    policy, tokenizer = load_model(replace_model_name(model_cfg, store.policy_dir(iteration + 1, "")))
    reference, _ = load_model(replace_model_name(model_cfg, reference_dir))
    completion = row["tree"]["best_text"]
    beta = config["train"]["beta"]
    rewards = implicit_reward(policy, reference, tokenizer, [row["prompt"]], [completion], beta,
                              completion_logprobs)[0]
    tokens = completion_tokens(tokenizer, completion)
    title = f"iteration {iteration}, {row['problem_id']}: sum beta*log(pi/pi_ref) = {sum(rewards):+.3f}"
    write_text(out, credit_map_html(tokens, rewards, title))
    return out
