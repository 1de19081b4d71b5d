"""Training output: a bar and one summary line per phase, not the Trainer's metric dicts; the full
log stays in the phase directory (log.jsonl, log_history.json)."""

from __future__ import annotations

import json

import pytest
from test_train_stage import config, dpo_rows, sft_rows, write_rows

from pipeline.config import ModelConfig, TrainMode
from pipeline.lm.models import load_model
from pipeline.run.progress import weight_bars_off
from pipeline.run.train_progress import summary_line
from pipeline.stages.train import train_policy


def test_summary_line_names_each_phase_measure():
    history = [
        {"loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "logps/chosen": -58.0,
         "mean_token_accuracy": 0.0, "step": 1},
        {"loss": 0.5894, "rewards/margins": 0.237, "rewards/accuracies": 0.6, "logps/chosen": -57.4,
         "mean_token_accuracy": 0.0, "step": 2},
        {"train_runtime": 1.5, "train_loss": 0.64, "step": 2},
    ]
    line = summary_line("dpo", history, 2, 1.52)
    assert line == ("train dpo: 2 steps in 1.5 s; loss 0.6931 -> 0.5894; reward margin 0.000 -> "
                    "0.237; pair accuracy 0.00 -> 0.60; chosen log-prob -58.00 -> -57.40")
    sft = summary_line("sft", [{"loss": 4.5, "mean_token_accuracy": 0.15}], 1, 0.4)
    assert sft == "train sft: 1 steps in 0.4 s; loss 4.5000; token accuracy 0.150"
    assert summary_line("sft", [], 0, 0.0) == "train sft: 0 steps in 0.0 s"


@pytest.mark.parametrize("progress", [False, True])
def test_training_prints_a_bar_and_one_line_per_phase(tiny_model_dir, tmp_path, capfd, progress):
    data = write_rows(tmp_path / "data", dpo_rows(), sft_rows())
    metrics = train_policy(tiny_model_dir, data, config(mode=TrainMode.dpo_then_sft, epochs=2),
                           tmp_path / "out", progress=progress)
    out, err = capfd.readouterr()
    lines = [line.strip() for chunk in err.split("\r") for line in chunk.splitlines()]
    dpo = [line for line in lines if line.startswith("qstar: train dpo:")]
    sft = [line for line in lines if line.startswith("qstar: train sft:")]
    assert len(dpo) == 1 and len(sft) == 1
    assert f"{metrics['dpo/steps']} steps" in dpo[0] and "reward margin" in dpo[0]
    assert f"-> {metrics['dpo/loss_last']:.4f}" in dpo[0]
    assert "token accuracy" in sft[0] and "reward margin" not in sft[0]
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err  # no metric dicts
    assert "Tokenizing train dataset" not in err  # datasets' map bars are off during a phase
    assert "Loading weights" not in err and "Writing model shards" not in err  # checkpoint bars
    bars = [line for line in lines if line.startswith("train dpo:") and "step" in line]
    assert bool(bars) == progress
    for phase in ("dpo", "sft"):
        phase_dir = tmp_path / "out" / "trainer" / phase
        live = [json.loads(x) for x in (phase_dir / "log.jsonl").read_text().splitlines()]
        assert live == json.loads((phase_dir / "log_history.json").read_text())
        assert sum("loss" in row for row in live) == metrics[f"{phase}/steps"]


def test_loading_a_model_prints_no_checkpoint_bar(tiny_model_dir, capfd):
    load_model(ModelConfig(name=str(tiny_model_dir)))
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.parametrize("hub_off", [False, True])
@pytest.mark.parametrize("transformers_on", [False, True])
def test_weight_bars_off_keeps_hub_download_bars_and_restores_both(transformers_on, hub_off):
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    try:
        (logging.enable_progress_bar if transformers_on else logging.disable_progress_bar)()
        (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()
        with weight_bars_off():
            assert not logging.is_progress_bar_enabled()
            assert hub.are_progress_bars_disabled() == hub_off  # downloads keep their bar
        assert logging.is_progress_bar_enabled() == transformers_on
        assert hub.are_progress_bars_disabled() == hub_off
    finally:
        (logging.enable_progress_bar if before[0] else logging.disable_progress_bar)()
        (hub.disable_progress_bars if before[1] else hub.enable_progress_bars)()
