"""Which log-ratio is the implicit reward of a policy trained DPO then SFT? And the DPO phase's
model for runs trained before the train stage kept it.

    python benchmarks/implicit_policy.py --run RUN --iterations 3 --keep
    python benchmarks/implicit_policy.py --run RUN --samples 1=EVAL_JSON 2=EVAL_JSON \
        [--output benchmarks/results/implicit_policy_dev.json]

--keep: for each iteration i < --iterations whose policy DPO then SFT trained without keeping
   its DPO phase (runs before the train stage kept it), trains that phase again: the recorded
   source policy, data, train config (train.mode=dpo) and reference, through
   pipeline.stages.train.train_policy. Its DPO metrics over every pair must equal the recorded
   ones (dpo/after/*, within --tolerance: the same training), else nothing is kept and the
   benchmark stops with one line (exit 2). The model moves into the policy as `dpo_phase/` and
   meta.json records `implicit_policy`, as the train stage does now.
--samples I=EVAL_JSON: on the samples of a best-of-N eval of policy I (`qstar eval
   decode=best_of_n`, any split), three log-ratios, each summed over a sample's tokens
   (teacher-forced, the text re-tokenized): the policy's over its DPO reference (what the
   implicit reward was before the DPO phase was kept), the DPO phase's over the reference (what
   it is now), and the SFT phase's (the policy over the DPO phase). Per log-ratio: the
   within-problem AUC (right against wrong samples of one problem), the accuracy of picking each
   problem's highest-scored sample, and that pick against the eval's majority vote problem by
   problem (benchmarks/paired.py). The split is the eval's; the log-probs are cached beside the
   output, so a killed run resumes.
   The DPO phase's log-ratio is also read per line (an option is a line; a token holding a
   newline closes its line, blank lines are skipped), as a PRM is read per step: its mean per
   token, the worst line's sum and mean (min over lines), the last line's sum, and the sum
   without the `Answer:` line (`LINE_AGGREGATES`). The question they ask: DPO's pairs from the
   trees differ at one step, so is the reward's signal local to a step, and drowned in the sum?
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from paired import paired  # noqa: E402

from mcts.options import is_answer_line  # noqa: E402
from pipeline.compose import load_run_config  # noqa: E402
from pipeline.config import TrainMode  # noqa: E402
from pipeline.errors import QstarError  # noqa: E402
from pipeline.lm.models import resolve_model_path  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402
from pipeline.stages.reference import (  # noqa: E402
    DPO_PHASE,
    dpo_reference,
    implicit_policy,
    reference_dir,
)

RESULTS = ROOT / "benchmarks" / "results"
AFTER = "dpo/after/"  # the train stage's DPO metrics over every pair


def _meta_phases(policy: str) -> list[str]:
    """The phases that trained the policy, from its meta.json ([] for the base model)."""
    meta = Path(policy) / "meta.json"
    return json.loads(meta.read_text())["metrics"].get("phases", []) if meta.is_file() else []


def keep(store: RunStore, cfg, i: int, tolerance: float) -> dict:
    """policy_{i+1}'s DPO phase, trained again and kept inside it (see the module docstring)."""
    from pipeline.stages.train import train_policy

    base = resolve_model_path(cfg.model)
    policy = store.policy_dir(i + 1, base)
    meta_path = Path(policy) / "meta.json"
    if not meta_path.is_file():
        return {"iteration": i, "kept": None, "why": "nothing was trained in this iteration"}
    meta = json.loads(meta_path.read_text())
    phases = meta["metrics"].get("phases", [])
    if implicit_policy(policy) is not None:
        return {"iteration": i, "kept": "already"}
    if phases != ["dpo", "sft"]:
        return {"iteration": i, "kept": None, "why": f"phases {phases}: the policy is DPO's own"}
    phase = Path(policy) / DPO_PHASE
    work = store.stage_dir(i, "train") / "dpo_phase_again"
    found = {}
    if not phase.is_dir():  # a move done before a kill is complete: os.replace is atomic
        source = store.policy_dir(i, base)
        found = train_policy(source, store.stage_dir(i, "data"), replace(cfg.train, mode=TrainMode.dpo),
                             work, model_cfg=replace(cfg.model, name=source), iteration=i,
                             reference_dir=reference_dir(policy, cfg.model))  # DPO trained it
        recorded = {k: v for k, v in meta["metrics"].items() if k.startswith(AFTER)}
        off = {k: (found.get(k), v) for k, v in recorded.items()
               if found.get(k) is None or abs(found[k] - v) > tolerance}
        if not recorded or off:
            raise QstarError(f"iteration {i}: the DPO phase trained again is not the run's "
                             f"({off or 'the run recorded no dpo/after metrics'}); nothing kept")
        (work / "policy" / "meta.json").unlink()  # as the train stage keeps it: weights only
        os.replace(work / "policy", phase)
        shutil.rmtree(work)
    write_json(meta_path, {**meta, "implicit_policy": DPO_PHASE})
    return {"iteration": i, "kept": str(phase),
            "matched": {k: found[k] for k in found if k.startswith(AFTER)}}


def text_logprobs(model_dir: str, cfg, prompts: list[str], texts: list[str], cache: Path) -> list[list[float]]:
    """Each text's teacher-forced per-token log-probs after its prompt (cached)."""
    from pipeline.lm.models import load_model
    from pipeline.lm.teacher_forced import completion_logprobs

    if not cache.is_file():
        model, tokenizer = load_model(replace(cfg.model, name=model_dir))
        write_json(cache, completion_logprobs(model, tokenizer, prompts, texts,
                                              cfg.critics.score_batch_size))
    return json.loads(cache.read_text())


def text_lines(tokens: list[str], rewards: list[float]) -> list[tuple[str, list[float]]]:
    """Per-token rewards cut into lines, (line text, its tokens' rewards): a token holding a
    newline closes the line it is in (BPE may merge "\n\n"); blank lines are dropped."""
    if len(tokens) != len(rewards):
        raise ValueError(f"{len(tokens)} tokens but {len(rewards)} rewards")
    lines, text, part = [], "", []
    for token, reward in zip(tokens, rewards):
        text, part = text + token, [*part, reward]
        if "\n" in token:
            lines.append((text, part))
            text, part = "", []
    lines.append((text, part))
    return [(t, r) for t, r in lines if t.strip()]


LINE_AGGREGATES = {  # name -> f(lines) over a sample's non-blank lines (text_lines)
    "mean": lambda ls: sum(sum(r) for _, r in ls) / max(sum(len(r) for _, r in ls), 1),
    "min_line": lambda ls: min((sum(r) for _, r in ls), default=0.0),
    "min_line_mean": lambda ls: min((sum(r) / len(r) for _, r in ls), default=0.0),
    "last_line": lambda ls: sum(ls[-1][1]) if ls else 0.0,
    "without_answer": lambda ls: sum(sum(r) for t, r in ls if not is_answer_line(t)),
}


def line_scores(tokens: list[list[str]], rewards: list[list[float]]) -> dict[str, list[float]]:
    """Per LINE_AGGREGATES name, one score per sample (its tokens' texts and rewards)."""
    lines = [text_lines(t, r) for t, r in zip(tokens, rewards, strict=True)]
    return {name: [f(ls) for ls in lines] for name, f in LINE_AGGREGATES.items()}


def log_ratios(store: RunStore, cfg, i: int, eval_json: Path, cache: Path) -> dict:
    """The three log-ratios on policy i's best-of-N samples, and the DPO phase's read per line
    (see the module docstring)."""
    from critics.implicit import completion_tokens
    from critics.metrics import within_problem_auc
    from pipeline.lm.models import load_tokenizer
    from pipeline.tasks import make_task
    from pipeline.tasks.prompt import task_prompts

    graded = json.loads(eval_json.read_text())
    if "split" not in graded.get("summary", {}) or not graded.get("rows") or any(
            "candidates" not in r for r in graded["rows"]):
        raise QstarError(f"--samples {eval_json}: not a best-of-N `qstar eval` JSON (it needs "
                         "summary.split and rows with candidates)")
    split, rows = graded["summary"]["split"], graded["rows"]
    policy = store.policy_dir(i, resolve_model_path(cfg.model))
    phase = implicit_policy(policy)
    if phase is None:
        phases = _meta_phases(policy)
        if phases != ["dpo", "sft"]:
            raise QstarError(f"policy {i} ({policy}) was trained in phases {phases}: no SFT phase "
                             "followed DPO, so there is no SFT part to split off (dpo_then_sft only)")
        raise QstarError(f"policy {i} ({policy}) has no kept DPO phase: run --keep first")
    task = make_task(cfg.task)
    problems = {p.id: p for p in task.split(split)}
    tokenizer = load_tokenizer(cfg.model, policy)
    prompts = task_prompts(tokenizer, task, [problems[r["id"]] for r in rows])
    flat = [(r["id"], prompt, c) for r, prompt in zip(rows, prompts, strict=True) for c in r["candidates"]]
    ids, texts = [f[0] for f in flat], [f[2] for f in flat]
    right = [float(task.is_correct(problems[pid], c)) for pid, c in zip(ids, texts)]
    logprobs = {name: text_logprobs(d, cfg, [f[1] for f in flat], texts,
                                    cache / f"p{i}_{eval_json.stem}_{name}_tokens.json")
                for name, d in (("reference", reference_dir(policy, cfg.model)), ("dpo", phase),
                                ("policy", policy))}
    sums = {name: [sum(lp) for lp in found] for name, found in logprobs.items()}
    beta = dpo_reference(policy)[1]
    scores = {"policy": [beta * (p - r) for p, r in zip(sums["policy"], sums["reference"])],
              "dpo_phase": [beta * (d - r) for d, r in zip(sums["dpo"], sums["reference"])],
              "sft_phase": [p - d for p, d in zip(sums["policy"], sums["dpo"])]}
    per_token = [[beta * (d - r) for d, r in zip(dpo, ref, strict=True)]
                 for dpo, ref in zip(logprobs["dpo"], logprobs["reference"], strict=True)]
    scores |= {f"dpo_phase_{name}": found for name, found in line_scores(
        [completion_tokens(tokenizer, t) for t in texts], per_token).items()}
    majority = {r["id"]: r["correct_by_select"]["majority"] if "correct_by_select" in r else
                bool(r["correct"]) for r in rows}  # rows graded before correct_by_select: select
    if "correct_by_select" not in rows[0] and graded["summary"]["select"] != "majority":
        raise QstarError(f"{eval_json}: selected by {graded['summary']['select']} and its rows "
                         "do not record majority's grade (correct_by_select): grade it again")
    out = {"policy": i, "split": split, "problems": len(rows), "samples": len(texts),
           "majority": sum(majority.values()) / len(rows), "by_log_ratio": {}}
    for name, score in scores.items():
        picks, start = {}, 0
        for r in rows:
            k = len(r["candidates"])
            best = max(range(k), key=lambda j: (score[start + j], -j))  # ties: the earliest
            picks[r["id"]] = right[start + best] == 1.0
            start += k
        auc, n = within_problem_auc(score, right, ids)
        out["by_log_ratio"][name] = {"within_problem_auc": auc, "within_problem_problems": n,
                     "argmax": sum(picks.values()) / len(rows),
                     "argmax_vs_majority": paired(picks, majority, (name, "majority"))}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a qstar run directory")
    parser.add_argument("--iterations", type=int, default=0,
                        help="with --keep: the iterations whose policies get their DPO phase")
    parser.add_argument("--keep", action="store_true",
                        help="train the DPO phase again where the run did not keep it")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest difference of a dpo/after metric that is the same training")
    parser.add_argument("--samples", nargs="*", default=[], metavar="I=EVAL_JSON",
                        help="a best-of-N eval JSON of policy I")
    parser.add_argument("--output", type=Path, default=RESULTS / "implicit_policy.json")
    args = parser.parse_args(argv)
    if not (args.run / "manifest.json").is_file():
        parser.error(f"--run {args.run}: no manifest.json (not a qstar run directory)")
    samples = []
    for item in args.samples:
        policy, sep, path = item.partition("=")
        if not (sep and policy.isdigit() and int(policy) >= 1 and Path(path).is_file()):
            parser.error(f"--samples {item!r}: expected I=EVAL_JSON, I >= 1 a trained policy "
                         "and EVAL_JSON a file")
        samples.append((int(policy), Path(path)))
    try:
        store, cfg = RunStore(args.run), load_run_config(args.run, [])
        kept = [keep(store, cfg, i, args.tolerance) for i in range(args.iterations)] if args.keep else []
        cache = args.output.parent / f".{args.output.stem}_logprobs"
        rows = [log_ratios(store, cfg, i, path, cache) for i, path in samples]
    except QstarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"run": str(args.run), "kept": kept, "log_ratios": rows}
    if rows:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    for row in rows:
        print(f"policy {row['policy']} ({row['split']}, {row['problems']} problems): majority "
              f"{row['majority']:.2f}; " + "; ".join(
                  f"{name} AUC {found['within_problem_auc'] or float('nan'):.3f} argmax "
                  f"{found['argmax']:.2f}" for name, found in row["by_log_ratio"].items()))
    return result


if __name__ == "__main__":
    main()
