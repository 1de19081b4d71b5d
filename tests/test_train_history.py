"""train.history and train.from_base: each train stage trains on the rows of several
iterations, optionally from policy_0 (STaR's and ReST-EM's recipe), and the older data
directories travel to a Ray worker like the newest one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_shipped_files import run_shipped
from test_train_stage import config, dpo_rows, sft_rows, write_rows

from pipeline.compose import compose_config
from pipeline.config import TrainConfig, TrainMode
from pipeline.loop import open_loop
from pipeline.run.store import RunStore
from pipeline.stages import train
from pipeline.stages.train import data_refs, train_policy


@pytest.mark.parametrize("history, windows", [
    (1, [[0], [1], [2], [3]]),
    (2, [[0], [0, 1], [1, 2], [2, 3]]),
    (-1, [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]),
])
def test_history_names_the_data_stages_of_its_window(history, windows, tmp_path):
    loop = SimpleNamespace(cfg=SimpleNamespace(train=TrainConfig(history=history)),
                           store=RunStore(tmp_path / "run"))
    for i, window in enumerate(windows):
        assert data_refs(loop, i) == [f"iter_{j:03d}/data" for j in window]


def test_earlier_rows_train_beside_the_iterations_own(tiny_model_dir, tmp_path):
    old = write_rows(tmp_path / "old", dpo=dpo_rows()[:2], sft=sft_rows()[:1])
    new = write_rows(tmp_path / "new", dpo=dpo_rows()[2:], sft=sft_rows()[1:])
    cfg = config(mode=TrainMode.dpo_then_sft, epochs=1, batch_size=1)
    metrics = train_policy(str(tiny_model_dir), new, cfg, tmp_path / "train", earlier_data=[old])
    assert (metrics["pairs"], metrics["sft_rows"], metrics["data_iterations"]) == (5, 4, 2)
    assert (metrics["dpo/rows"], metrics["sft/rows"]) == (5, 4)
    assert (metrics["dpo/steps"], metrics["sft/steps"]) == (5, 4)  # one row per step, one epoch
    meta = json.loads((tmp_path / "train" / "policy" / "meta.json").read_text())
    assert (meta["earlier_data"], meta["data_dir"]) == ([str(old)], str(new))


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, tiny_model_dir):
    """A 2-iteration tiny loop with train.history=-1 and train.from_base=true, hand-made rows
    and each stage's run files packed as under Ray (test_shipped_files.run_shipped)."""
    root = tmp_path_factory.mktemp("restarted")
    overrides = ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={root / 'cache'}",
                 "search.trees_per_batch=2", "train.learning_rate=1e-3", "iterations=2",
                 "train.history=-1", "train.from_base=true", "train.reference=base"]
    return root / "run", run_shipped(overrides, root / "run"), overrides


def test_each_iteration_trains_the_base_model_on_every_row_so_far(restarted, tiny_model_dir):
    run, packs, _ = restarted
    store = RunStore(run)
    first, second = store.metrics(0, "train"), store.metrics(1, "train")
    assert (first["pairs"], first["data_iterations"]) == (len(dpo_rows()), 1)
    assert (second["pairs"], second["data_iterations"]) == (2 * len(dpo_rows()), 2)
    assert second["source_policy"] == first["source_policy"] == str(tiny_model_dir)
    assert second["policy_dir"] == "iter_001/train/policy"  # the next policy is the new one
    meta = json.loads((run / "iter_001/train/policy/meta.json").read_text())
    # run-relative: the run's own dirs, not the worker's copies
    assert (meta["earlier_data"], meta["data_dir"]) == (["iter_000/data"], "iter_001/data")
    # the older rows travelled to the worker; policy_1 did not (training starts from policy_0)
    shipped = {f for at, files in packs if at == (1, "train") for f in files}
    assert {"iter_000/data/dpo.jsonl", "iter_001/data/dpo.jsonl"} <= shipped
    assert not any(f.startswith("iter_000/train/") for f in shipped)


def test_nothing_to_train_keeps_policy_i_not_the_base(restarted, monkeypatch):
    run, _, overrides = restarted
    loop = open_loop(compose_config(overrides), RunStore(run))
    monkeypatch.setattr(type(loop), "run_remote",
                        lambda self, *args, **kwargs: {"skipped": "no DPO pairs"})
    assert train.run(loop, 1)["policy_dir"] == "iter_000/train/policy"
