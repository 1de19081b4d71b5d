"""wandb offline tracking (the CLI default) logs stage metrics into the run directory."""

import os

from pipeline.compose import compose_config
from pipeline.run.store import RunStore
from pipeline.run.tracking import Tracker, flatten


def test_flatten_keeps_numbers_under_stage_prefixes():
    flat = flatten({"orm": {"auc": 0.8, "skipped": {}}, "solved": 3, "ok": True, "name": "x"}, "critics")
    assert flat == {"critics/orm/auc": 0.8, "critics/solved": 3}


def test_offline_wandb_run_resumes_with_the_same_id(tmp_path, monkeypatch, debug_overrides):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(debug_overrides + ["tracking.wandb_mode=offline"])
    store = RunStore(tmp_path)
    tracker = Tracker(cfg, store)
    assert tracker.report_to == "wandb"
    tracker.log(0, "search", {"solve_rate": 0.5}, 1.0)
    tracker.finish()
    run_id = store.manifest["wandb_id"]
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    again = Tracker(cfg, RunStore(tmp_path))
    assert again.run.id == run_id
    again.finish()


def test_the_config_decides_the_mode_unless_the_environment_names_one(tmp_path, monkeypatch,
                                                                       debug_overrides):
    """The CLI sets no WANDB_MODE of its own, so tracking.wandb_mode=disabled opens no wandb run
    (it used to default the variable to offline, which then won over the config)."""
    from pipeline.cli import _quiet_libraries

    monkeypatch.delenv("WANDB_MODE")
    _quiet_libraries()
    assert "WANDB_MODE" not in os.environ
    cfg = compose_config(debug_overrides + ["tracking.wandb_mode=disabled"])
    tracker = Tracker(cfg, RunStore(tmp_path / "run"))
    assert (tracker.mode, tracker.run, tracker.report_to) == ("disabled", None, "none")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(cfg, RunStore(tmp_path / "run"))
    assert tracker.mode == "offline" and tracker.report_to == "wandb"
    tracker.finish()
