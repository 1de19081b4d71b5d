"""What each stage ships to its workers under cluster=ray: a model a policy keeps for its
implicit reward (the DPO phase of dpo_then_sft, the SFT phase that is train.reference=sft's
reference; each a whole second model) travels only to the stages that compute that reward.

The loop runs in-process, but every stage's run files are packed and unpacked into a fresh
worker directory as Ray would move them (pipeline/run/transfer.py), so a file a stage needs and
was not shipped fails the run here as it would on a cluster."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train_stage import dpo_rows, sft_rows, write_rows

from pipeline import loop as loop_module
from pipeline.compose import compose_config
from pipeline.loop import run_loop
from pipeline.run.store import STAGES, RunStore
from pipeline.run.transfer import RunFiles, pack
from pipeline.run.workers import Cluster
from pipeline.stages.reference import DPO_PHASE, SFT_PHASE

TRAININGS = {DPO_PHASE: ["train=dpo_then_sft"], SFT_PHASE: ["train=dpo", "train.reference=sft"]}


@pytest.fixture(scope="module", params=list(TRAININGS))
def shipped(request, tmp_path_factory, tiny_model_dir):
    """A 2-iteration tiny loop that keeps `kept` in each policy, best-of-N eval; each stage's
    packed file names. Hand-made rows (run_shipped) give both trainings two phases."""
    kept = request.param
    root = tmp_path_factory.mktemp("shipped")
    overrides = ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={root / 'cache'}",
                 *TRAININGS[kept], "search.trees_per_batch=2", "train.learning_rate=1e-3",
                 "iterations=2", "eval.decodes=[best_of_n]"]
    return root / "run", run_shipped(overrides, root / "run"), kept


def run_shipped(overrides: list[str], run: Path) -> list[tuple[tuple[int, str], list[str]]]:
    """The loop with each data stage's rows replaced by hand-made pairs and SFT rows (the tiny
    model finds no verified solution), every stage's run files packed and unpacked as under
    Ray; each shipment's (iteration, stage) and file names."""
    packs, now = [], {}
    with pytest.MonkeyPatch.context() as mp:
        for stage, fn in loop_module.STAGE_RUNNERS.items():
            def timed(loop, i, stage=stage, fn=fn):
                now["at"] = (i, stage)
                result = fn(loop, i)
                if stage == "data":
                    write_rows(loop.store.stage_dir(i, "data"), dpo_rows(), sft_rows())
                return result
            mp.setitem(loop_module.STAGE_RUNNERS, stage, timed)

        def share(self, run_root, rels, skip=()):  # as under Ray: a packed copy
            packed = pack(run_root, rels, skip)
            packs.append((now.get("at", (0, "baseline")), sorted(packed)))
            return RunFiles(refs={k: [v] for k, v in packed.items()})
        mp.setattr(Cluster, "share", share)
        mp.setitem(sys.modules, "ray", SimpleNamespace(get=lambda ref: ref))  # a fake store
        run_loop(compose_config(overrides), run)
    return packs


def _phases(files: list[str]) -> set[tuple[str, str]]:
    """(policy, kept model) for every kept model among `files`."""
    return {(f.split(f"/{k}/")[0], k) for f in files for k in TRAININGS if f"/{k}/" in f}


def test_a_kept_model_travels_only_where_its_implicit_reward_is_computed(shipped):
    run, packs, kept = shipped
    store = RunStore(run)
    assert all(store.done(i, s) for i in range(2) for s in STAGES)  # every needed file arrived
    policy_1, policy_2 = "iter_000/train/policy", "iter_001/train/policy"
    for policy in (policy_1, policy_2):  # the test needs kept models
        assert (run / policy / kept / "config.json").is_file()
    by_stage = {}
    for at, files in packs:
        by_stage.setdefault(at, set()).update(_phases(files))
    # refit and best-of-N eval judge the new policy's implicit reward: its kept model, no other
    assert by_stage[(0, "refit")] == by_stage[(0, "eval")] == {(policy_1, kept)}
    assert by_stage[(1, "refit")] == by_stage[(1, "eval")] == {(policy_2, kept)}
    # search (no implicit weight) and train (policy_1 as start and reference) need none of it
    assert by_stage[(1, "search")] == by_stage[(1, "train")] == set()
    train_files = next(files for at, files in packs if at == (1, "train"))
    assert f"{policy_1}/model.safetensors" in train_files  # the policy itself still travels
