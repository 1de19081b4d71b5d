"""The refit stage: after train, the critics' heads are fitted again on the same trees on the new
policy's features, so critics_{i+1} judge policy_{i+1} and share its weights (no second model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import pipeline.stages.critics as critics_stage
import pipeline.stages.eval as eval_stage
import pipeline.stages.search as search_stage
from critics import KINDS, CriticSet
from critics.critic_set import backbone_of
from pipeline import loop as loop_module
from pipeline.compose import compose_config
from pipeline.config import QstarConfig
from pipeline.loop import resume_run, run_loop
from pipeline.report.collect import run_status
from pipeline.report.summary import critics_metrics
from pipeline.run.store import STAGES, RunStore
from pipeline.stages.critics import refit_skipped


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory, tiny_model_dir):
    """A 2-iteration tiny DPO loop, with every model load and critic load recorded by stage."""
    root = tmp_path_factory.mktemp("refit")
    overrides = ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={root / 'cache'}",
                 "search.trees_per_batch=2", "train.learning_rate=1e-3", "iterations=2",
                 "eval.decodes=[greedy]"]
    calls, now = [], {}
    with pytest.MonkeyPatch.context() as mp:
        for stage, fn in loop_module.STAGE_RUNNERS.items():
            def timed(loop, i, stage=stage, fn=fn):
                now["at"] = (i, stage)
                return fn(loop, i)
            mp.setitem(loop_module.STAGE_RUNNERS, stage, timed)

        def spy(module, what):
            real = module.load_model

            def load(*args, **kwargs):
                model, tokenizer = real(*args, **kwargs)
                calls.append((*now.get("at", (0, "baseline")), what, model))
                return model, tokenizer
            mp.setattr(module, "load_model", load)

        spy(search_stage, "policy")
        spy(eval_stage, "policy")
        spy(critics_stage, "backbone")
        real_load = CriticSet.load.__func__

        def load_set(cls, directory, model, *args, **kwargs):
            calls.append((*now["at"], "critics", model))
            return real_load(cls, directory, model, *args, **kwargs)
        mp.setattr(CriticSet, "load", classmethod(load_set))
        run_loop(compose_config(overrides), root / "run")
    return root / "run", calls


def test_every_stage_of_both_iterations_completes(two_iterations):
    run, _ = two_iterations
    store = RunStore(run)
    assert all(store.done(i, s) for i in range(2) for s in STAGES)
    assert not store.metrics(0, "train").get("skipped"), "the test needs a trained policy"
    assert not store.metrics(0, "refit").get("skipped")
    assert sorted(p.name for p in (run / "iter_000/refit").iterdir()) == \
        ["metrics.json", "orm", "prm", "value"]
    assert store.critics_dir(1) == run / "iter_000/refit"  # search of 1, eval of 0
    assert store.critics_dir(2) == run / "iter_001/refit"  # eval of 1


def test_refit_heads_name_the_trained_policy_as_backbone(two_iterations):
    run, _ = two_iterations
    store = RunStore(run)
    for kind in KINDS:
        meta = json.loads((run / f"iter_000/refit/{kind}/meta.json").read_text())
        assert meta["backbone"] == "../train/policy"  # relative: the run can move
    assert backbone_of(run / "iter_000/refit") == store.policy_dir(1, "base")  # policy_1
    assert store.metrics(0, "refit")["backbone"] == "../train/policy"


def test_search_and_eval_share_the_policy_with_the_refit_heads(two_iterations):
    _, calls = two_iterations
    for at in ((1, "search"), (0, "eval"), (1, "eval")):
        loaded = [(what, model) for i, stage, what, model in calls if (i, stage) == at]
        assert [what for what, _ in loaded] == ["policy", "critics"], at  # no backbone load
        assert loaded[1][1] is loaded[0][1], at  # the critics read the policy's own weights
    # only the refit stage loads a backbone (the policy being fitted to), once per iteration:
    # the critics stage leaves the heads to it
    assert [(i, stage, what) for i, stage, what, _ in calls if stage in ("critics", "refit")] == \
        [(0, "refit", "backbone"), (1, "refit", "backbone")]


def test_qstar_run_search_scores_leaves_from_its_own_decoding_pass(two_iterations):
    """critics.leaf_features=generation on the real path: iteration 1's search, with the refit
    critics on policy_1, scores every leaf from generation; iteration 0 had no critics."""
    store = RunStore(two_iterations[0])
    assert "critic_leaves" not in store.metrics(0, "search")
    scored = store.metrics(1, "search")["critic_leaves"]
    assert scored["generation"] > 0 and scored["backbone"] == 0


def test_the_critics_stage_leaves_the_heads_to_the_refit(two_iterations):
    run, _ = two_iterations
    store = RunStore(run)
    for i in range(2):
        assert "refit stage fits the heads once" in store.metrics(i, "critics")["skipped"]
        assert not (run / f"iter_{i:03d}/critics").exists()


def test_refit_metrics_judge_the_dpo_trained_policy(two_iterations):
    run, _ = two_iterations
    refit = json.loads((run / "iter_000/refit/metrics.json").read_text())
    for kind in KINDS:
        assert {"within_problem_auc", "within_problem_problems", "auc"} <= refit[kind].keys()
    assert "skipped" not in refit["implicit"]  # policy_1 has a DPO reference: policy_0
    assert {"beta", "auc", "within_problem_auc"} <= refit["implicit"].keys()
    assert critics_metrics(RunStore(run), 0) == RunStore(run).metrics(0, "refit")


def test_a_run_killed_before_refit_resumes_with_it(two_iterations, tmp_path):
    reference, _ = two_iterations
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("refit", "eval"):  # killed after train: neither refit nor eval completed
        del manifest["stages"][f"iter_001/{stage}"]
        shutil.rmtree(run / f"iter_001/{stage}")
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert RunStore(run).critics_dir(2) is None  # until refit is done: the critics stage deferred
    resume_run(str(run), [])
    store = RunStore(run)
    assert store.done(1, "refit") and store.done(1, "eval")
    assert store.critics_dir(2) == run / "iter_001/refit"
    for kind in KINDS:  # the same trees, policy and seed: the same heads
        again = load_file(str(run / f"iter_001/refit/{kind}/head.safetensors"))
        first = load_file(str(reference / f"iter_001/refit/{kind}/head.safetensors"))
        assert all(torch.equal(again[k], first[k]) for k in first), kind


def _store(tmp_path: Path, **metrics) -> RunStore:
    store = RunStore(tmp_path)
    for stage, found in metrics.items():
        store.complete(0, stage, found, 1.0)
    return store


def _loop(store: RunStore, **critics) -> SimpleNamespace:
    cfg = QstarConfig()
    for key, value in critics.items():
        setattr(cfg.critics, key, value)
    return SimpleNamespace(cfg=cfg, store=store)


HEADS = {"orm": {"auc": 0.6}}
TRAINED = {"policy_dir": "iter_000/train/policy"}


@pytest.mark.parametrize("critics, metrics, why", [
    ({"refit": False}, {"critics": HEADS, "train": TRAINED}, "critics.refit=false"),
    ({"backbone": "other/model"}, {"critics": HEADS, "train": TRAINED}, "critics.backbone="),
    ({"enabled": False}, {"critics": {"skipped": "critics.enabled=false"}, "train": TRAINED},
     "critics.enabled=false"),
    ({}, {"critics": HEADS, "train": TRAINED, "eval": {}}, "predates the refit stage"),
])
def test_refit_is_skipped_with_a_reason_and_critics_fall_back(tmp_path, critics, metrics, why):
    store = _store(tmp_path, **metrics)
    assert why in refit_skipped(_loop(store, **critics), 0)
    store.complete(0, "refit", {"skipped": refit_skipped(_loop(store, **critics), 0)}, 0.0)
    expected = None if metrics["critics"].get("skipped") else tmp_path / "iter_000/critics"
    assert store.critics_dir(1) == expected


@pytest.mark.parametrize("train", [TRAINED, {"policy_dir": "base", "skipped": "no rows"}])
def test_refit_fits_the_heads_whether_or_not_a_policy_was_trained(tmp_path, train):
    """Nothing trained: policy_{i+1} is policy_i, and the refit fits on it (the critics stage
    deferred to it)."""
    deferred = {"skipped": "the refit stage fits the heads once"}
    assert refit_skipped(_loop(_store(tmp_path, critics=deferred, train=train)), 0) is None


@pytest.mark.parametrize("critics, fits", [({}, False), ({"refit": False}, True),
                                           ({"backbone": "other/model"}, True),
                                           ({"enabled": False}, False)])
def test_the_critics_stage_fits_only_when_no_refit_follows(tmp_path, monkeypatch, critics, fits):
    fitted = []
    monkeypatch.setattr(critics_stage, "fit_stage", lambda loop, i, stage, k: fitted.append(
        (i, stage, k)) or {"orm": {}})
    found = critics_stage.run(_loop(_store(tmp_path), **critics), 0)
    assert fitted == ([(0, "critics", 0)] if fits else [])
    assert ("skipped" in found) is not fits


def test_a_run_from_before_the_refit_stage_stays_complete(tmp_path):
    """Its iterations have no refit entry: critics_i are the critics stage's, the run is complete."""
    store = _store(tmp_path, baseline={}, search={}, critics=HEADS, data={}, train=TRAINED,
                   eval={})
    store.set_info(iterations=1)
    assert store.critics_dir(1) == tmp_path / "iter_000/critics"
    assert run_status(store)["complete"]
    assert critics_metrics(store, 0) == HEADS
