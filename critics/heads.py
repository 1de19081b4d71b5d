"""Scalar critic heads: a small MLP on cached backbone features, output in [0, 1].

Features are standardised inside the head (mean/std of its training set, saved with the
weights), because LM hidden states have a few huge dimensions that would otherwise dominate.
Weights are saved with safetensors and a meta.json, never pickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WIDTH = 256
LOSSES = ("mse", "bce")


class ScalarHead(nn.Module):
    """An MLP on the features; the last `linear_features` columns, if any, add a linear term
    beside it instead (the ORM's prompt state: a per-problem offset that cannot reorder the
    answers to one problem, which the MLP ranks from the other columns alone)."""

    def __init__(self, hidden_size: int, width: int = WIDTH, linear_features: int = 0):
        super().__init__()
        if not 0 <= linear_features < hidden_size:
            raise ValueError(f"linear_features={linear_features} must be in [0, {hidden_size})")
        self.hidden_size, self.width, self.linear_features = hidden_size, width, linear_features
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))
        mlp_in = hidden_size - linear_features
        self.net = nn.Sequential(nn.Linear(mlp_in, width), nn.GELU(), nn.Linear(width, 1))
        # Zero output layers: an untrained head says 0.5 (or its bias) for every text.
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        if linear_features:
            self.linear = nn.Linear(linear_features, 1, bias=False)
            nn.init.zeros_(self.linear.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits, shape (n,)."""
        x = (features - self.feature_mean) / self.feature_std
        if not self.linear_features:
            return self.net(x).squeeze(-1)
        split = self.hidden_size - self.linear_features
        return (self.net(x[:, :split]) + self.linear(x[:, split:])).squeeze(-1)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1], shape (n,)."""
        return torch.sigmoid(self(features.float()))


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss == "mse":
        return lambda logits, y: nn.functional.mse_loss(torch.sigmoid(logits), y)
    if loss == "bce":  # soft labels allowed
        return nn.functional.binary_cross_entropy_with_logits
    raise ValueError(f"unknown head loss {loss!r}; allowed: {', '.join(LOSSES)}")


@contextmanager
def _one_thread():
    """The head's ops are tiny: more threads only add synchronisation, which costs up to 100x
    when other processes share the cores (measured on the 2-core development machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_head(features: torch.Tensor, targets, loss: str, lr: float, epochs: int,
               batch_size: int, seed: int, linear_features: int = 0) -> tuple[ScalarHead, list[float]]:
    """Fit a head on (n, hidden) features and n targets in [0, 1]; returns the head and the
    mean training loss of each epoch. With no examples the head stays at 0.5."""
    with _one_thread():
        return _train_head(features, targets, _loss_fn(loss), lr, epochs, batch_size, seed,
                           linear_features)


def _train_head(features: torch.Tensor, targets, loss_of, lr: float, epochs: int,
                batch_size: int, seed: int, linear_features: int) -> tuple[ScalarHead, list[float]]:
    features = features.float()
    y = torch.as_tensor(targets, dtype=torch.float32)
    torch.manual_seed(seed)
    head = ScalarHead(features.shape[1], linear_features=linear_features)
    if len(y) == 0:
        return head, []
    head.feature_mean.copy_(features.mean(0))
    head.feature_std.copy_(features.std(0, unbiased=False).clamp(min=1e-6))
    base_rate = float(y.mean().clamp(0.01, 0.99))
    head.net[2].bias.data.fill_(math.log(base_rate / (1 - base_rate)))  # start at the base rate
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch_size):
            rows = order[start:start + batch_size]
            batch_loss = loss_of(head(features[rows]), y[rows])
            optimizer.zero_grad()
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item() * len(rows)
        losses.append(total / len(y))
    head.eval()
    return head, losses


def _replace_into(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def save_head(head: ScalarHead, directory: str | os.PathLike, meta: dict) -> None:
    """`directory/head.safetensors` + `directory/meta.json` (meta plus the head's shape)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    _replace_into(directory / "head.safetensors", lambda p: save_file(tensors, str(p)))
    meta = {**meta, "hidden_size": head.hidden_size, "width": head.width,
            "linear_features": head.linear_features}
    text = json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
    _replace_into(directory / "meta.json", lambda p: p.write_text(text, encoding="utf-8"))


def read_meta(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text(encoding="utf-8"))


def load_head(directory: str | os.PathLike) -> tuple[ScalarHead, dict]:
    directory = Path(directory)
    meta = read_meta(directory)
    # heads saved before linear_features existed have none
    head = ScalarHead(meta["hidden_size"], meta["width"], meta.get("linear_features", 0))
    head.load_state_dict(load_file(str(directory / "head.safetensors")))
    head.eval()
    return head, meta
