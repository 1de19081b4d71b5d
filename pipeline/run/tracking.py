"""Tracking: metrics.jsonl always (the run store writes it); wandb (offline by default); plots."""

from __future__ import annotations

import os
import uuid

from pipeline.config import QstarConfig, to_dict
from pipeline.run.store import RunStore


def flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


class Tracker:
    def __init__(self, cfg: QstarConfig, store: RunStore):
        self.cfg, self.store = cfg, store
        self.mode = os.environ.get("WANDB_MODE") or cfg.tracking.wandb_mode
        self.run = None
        if self.mode != "disabled":
            self.run = self._init_wandb()

    @property
    def report_to(self) -> str:
        """TRL's `report_to`: into this wandb run when one is open."""
        return "wandb" if self.run is not None else "none"

    def _init_wandb(self):
        import wandb

        run_id = self.store.manifest.get("wandb_id") or uuid.uuid4().hex[:12]
        self.store.set_info(wandb_id=run_id)
        os.environ["WANDB_MODE"] = self.mode
        return wandb.init(project=self.cfg.tracking.project, id=run_id, resume="allow",
                          dir=str(self.store.root), config=to_dict(self.cfg), mode=self.mode,
                          name=self.store.root.name)

    def log(self, iteration: int, stage: str, metrics: dict, seconds: float) -> None:
        if self.run is not None:
            data = flatten(metrics, stage)
            data.update({f"{stage}/seconds": seconds, "iteration": iteration})
            self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
