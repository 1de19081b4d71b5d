"""One row per policy (0 = base, k = after iteration k-1) from a run's manifest."""

from __future__ import annotations

from pipeline.run.store import BASELINE, RunStore

CRITICS = ("value", "prm", "orm", "implicit")  # within-problem AUC per critic, in the critics metrics
ITERATION_STAGES = ["search", "critics", "data", "train", "refit", "eval"]  # timed per row


def _value(metrics: dict | None, *path):
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def _dpo(train: dict | None, key: str):
    """A DPO metric over all pairs after training (dpo/after/<key>); runs trained before that was
    measured have only the last logged step's batch (dpo/<key>)."""
    after = _value(train, f"dpo/after/{key}")
    return after if after is not None else _value(train, f"dpo/{key}")


def policy_rows(store: RunStore) -> list[dict]:
    rows = []
    base = store.metrics(0, BASELINE)
    if base is not None:
        rows.append({"policy": 0, "accuracy": _accuracies(base), "minutes": _minutes(store, 0, [BASELINE]),
                     "peak_rss_mb": _peak_rss_mb(store, 0, [BASELINE])})
    k = 0
    while store.done(k, "eval"):
        data, train = store.metrics(k, "data"), store.metrics(k, "train")
        critics, search = critics_metrics(store, k), store.metrics(k, "search")
        rows.append({
            "policy": k + 1,
            "accuracy": _accuracies(store.metrics(k, "eval")),
            "pairs": _value(data, "dpo"),
            "sft_rows": _value(data, "sft"),
            "dpo_margin": _dpo(train, "rewards/margins"),
            "chosen_dlogp": _value(train, "dpo/logps/chosen_change"),
            "chosen_reward": _dpo(train, "rewards/chosen"),
            "rejected_reward": _dpo(train, "rewards/rejected"),
            "reference": _reference_kind(train),
            "within_auc": {kind: _value(critics, kind, "within_problem_auc") for kind in CRITICS},
            "orm_auc": _value(critics, "orm", "auc"),
            "prm_auc": _value(critics, "prm", "auc"),
            "value_ece": _value(critics, "value", "ece"),
            "search_solve_rate": _value(search, "solve_rate"),
            # what the search had to pair (none for runs searched before they were recorded)
            "contrast_problems": _value(search, "contrast_problems"),
            "option_logp_per_token": _value(search, "option_logp_per_token"),
            # generated tokens: the search's, or GRPO's sampling inside its train stage
            "tokens": _value(search, "tokens") if search else _value(train, "tokens"),
            "minutes": _minutes(store, k, ITERATION_STAGES),
            "peak_rss_mb": _peak_rss_mb(store, k, ITERATION_STAGES),
        })
        k += 1
    return rows


def critics_metrics(store: RunStore, k: int) -> dict | None:
    """The metrics of critics_{k+1}, the heads policy k+1 was evaluated with: iteration k's
    refit (fitted on policy k+1, its implicit reward judged) when it ran, else its critics stage."""
    refit = store.metrics(k, "refit")
    if refit is not None and not refit.get("skipped"):
        return refit
    return store.metrics(k, "critics")


def _reference_kind(train: dict | None) -> str | None:
    """previous: DPO trained against the policy it started from; base: against another (policy_0)."""
    reference = _value(train, "reference")
    if reference is None:
        return None
    return "previous" if reference == _value(train, "source_policy") else "base"


def _accuracies(metrics: dict | None) -> dict:
    decodes = _value(metrics, "decodes") or {}
    return {name: d["accuracy"] for name, d in decodes.items()}


def _peak_rss_mb(store: RunStore, iteration: int, stages: list[str]) -> float | None:
    """The largest driver peak among the stages (None for runs recorded before it was)."""
    entries = store.manifest["stages"]
    peaks = [entries[key].get("peak_rss_mb") for key in (store.key(iteration, s) for s in stages)
             if key in entries]
    return max((p for p in peaks if p is not None), default=None)


def _minutes(store: RunStore, iteration: int, stages: list[str]) -> float:
    entries = store.manifest["stages"]
    seconds = sum(entries[store.key(iteration, s)]["seconds"] for s in stages
                  if store.key(iteration, s) in entries)
    return round(seconds / 60, 2)
