"""Training output a person can read: one progress bar per phase and one summary line at its end,
instead of the Trainer's printed metric dicts (transformers' ProgressCallback/PrinterCallback).

Nothing is lost: every log row of the phase is in `<phase dir>/log.jsonl`, rewritten atomically
at each log step (so a killed run keeps what was logged), and in wandb when report_to says so.
The datasets/transformers bars of the dataset preparation and the model save are switched off
while a phase runs; TRL's reference log-prob pass keeps its own bar.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from pipeline.run.atomic import write_jsonl
from pipeline.run.progress import progress_bar, weight_bars_off

# (log key, label) shown on the bar as the phase runs
BAR_KEYS = {"dpo": (("loss", "loss"), ("rewards/margins", "margin")),
            "sft": (("loss", "loss"), ("mean_token_accuracy", "tok_acc"))}


def _steps(history: list[dict]) -> list[dict]:
    """The per-step log rows (the final summary row has train_runtime instead of loss)."""
    return [h for h in history if "loss" in h and "train_runtime" not in h]


def _first_last(rows: list[dict], key: str, spec: str) -> str | None:
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(values[0], spec)} -> {format(values[-1], spec)}"


def summary_line(phase: str, history: list[dict], steps: int, seconds: float) -> str:
    """One line for a finished phase: steps, time, loss first -> last and the phase's own
    measures (DPO: reward margin, pair accuracy, chosen log-prob; SFT: token accuracy)."""
    rows = _steps(history)
    parts = [f"train {phase}: {steps} steps in {seconds:.1f} s"]
    for key, label, spec in (("loss", "loss", ".4f"), ("rewards/margins", "reward margin", ".3f"),
                             ("rewards/accuracies", "pair accuracy", ".2f"),
                             ("logps/chosen", "chosen log-prob", ".2f"),
                             ("mean_token_accuracy", "token accuracy", ".3f")):
        if key == "mean_token_accuracy" and phase != "sft":
            continue  # TRL logs it for DPO too, where it means nothing
        shown = _first_last(rows, key, spec)
        if shown is not None:
            parts.append(f"{label} {shown}")
    return "; ".join(parts)


class TrainProgress(TrainerCallback):
    """A tqdm bar over the phase's optimizer steps (with the last loss, margin or token accuracy),
    log.jsonl kept current, and `summary_line` on stderr when the phase ends."""

    def __init__(self, phase: str, log_path: str | Path, stream=None, show_bar: bool = True):
        self.phase, self.log_path, self.show_bar = phase, Path(log_path), show_bar
        self.stream = stream
        self.bar = None
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.bar = progress_bar(desc=f"train {self.phase}" if self.show_bar else None,
                                total=state.max_steps,
                                initial=state.global_step, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        write_jsonl(self.log_path, state.log_history)
        if self.bar is not None and logs:
            shown = {label: f"{logs[key]:.4g}" for key, label in BAR_KEYS.get(self.phase, BAR_KEYS["sft"])
                     if key in logs}
            if shown:
                self.bar.set_postfix(shown)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        line = summary_line(self.phase, state.log_history, state.global_step,
                            time.perf_counter() - self.start)
        print(f"qstar: {line}", file=self.stream or sys.stderr, flush=True)


def show_progress(trainer, phase: str, phase_dir: str | Path, progress: bool) -> TrainProgress:
    """Replace the trainer's printed metric dicts with a TrainProgress writing phase_dir/log.jsonl
    (its bar only with progress=true; the summary line always)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = TrainProgress(phase, Path(phase_dir) / "log.jsonl", show_bar=progress)
    trainer.add_callback(callback)
    return callback


@contextmanager
def library_bars_off():
    """No datasets map bars ("Tokenizing train dataset") and no transformers checkpoint bars
    (weight_bars_off) inside the block; the switches are restored afterwards."""
    datasets_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with weight_bars_off():
            yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
