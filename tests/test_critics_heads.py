import json

import pytest
import torch
from safetensors.torch import load_file

from critics.heads import ScalarHead, load_head, save_head, train_head
from critics.metrics import auc, mse


def _separable(n=240, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * 5 + 3  # off-centre and wide, like LM hidden states
    y = ((x[:, 0] - 3) + 0.5 * (x[:, 1] - 3) > 0).float()
    return x, y


def test_bce_head_learns_a_separable_set():
    x, y = _separable()
    head, losses = train_head(x[:180], y[:180], "bce", lr=3e-2, epochs=20, batch_size=90, seed=0)
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    scores = head.predict(x[180:])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert auc(scores.numpy(), y[180:].numpy()) > 0.9


def test_mse_head_fits_soft_targets():
    x, _ = _separable(seed=1)
    y = torch.sigmoid((x[:, 0] - 3) / 5)
    head, losses = train_head(x, y, "mse", lr=3e-2, epochs=30, batch_size=120, seed=0)
    assert losses[-1] < losses[0]
    assert mse(head.predict(x).numpy(), y.numpy()) < 0.01


def test_training_is_seeded():
    x, y = _separable()
    a, _ = train_head(x, y, "bce", lr=1e-2, epochs=3, batch_size=32, seed=5)
    b, _ = train_head(x, y, "bce", lr=1e-2, epochs=3, batch_size=32, seed=5)
    assert torch.equal(a.predict(x), b.predict(x))


def test_no_examples_gives_an_untrained_head_at_one_half():
    head, losses = train_head(torch.zeros(0, 8), [], "bce", lr=1e-3, epochs=5, batch_size=4, seed=0)
    assert losses == []
    assert torch.allclose(head.predict(torch.randn(3, 8)), torch.full((3,), 0.5))


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="allowed: mse, bce"):
        train_head(torch.zeros(2, 4), [0.0, 1.0], "hinge", lr=1e-3, epochs=1, batch_size=2, seed=0)


def test_save_and_load_round_trip_with_safetensors(tmp_path):
    x, y = _separable()
    head, _ = train_head(x, y, "bce", lr=1e-2, epochs=3, batch_size=32, seed=0)
    save_head(head, tmp_path / "orm", {"kind": "orm", "note": "x"})
    assert sorted(p.name for p in (tmp_path / "orm").iterdir()) == ["head.safetensors", "meta.json"]
    assert set(load_file(str(tmp_path / "orm" / "head.safetensors"))) == set(head.state_dict())
    meta = json.loads((tmp_path / "orm" / "meta.json").read_text())
    assert meta == {"kind": "orm", "note": "x", "hidden_size": 16, "width": 256, "linear_features": 0}
    loaded, loaded_meta = load_head(tmp_path / "orm")
    assert isinstance(loaded, ScalarHead) and loaded_meta == meta
    assert torch.equal(loaded.predict(x), head.predict(x))


def test_linear_columns_shift_a_problem_but_never_reorder_its_answers(tmp_path):
    """The ORM's prompt state enters linearly: same prompt columns -> same offset for every
    answer, so answers to one problem are ranked by the other columns alone."""
    g = torch.Generator().manual_seed(0)
    answers, prompt_a, prompt_b = torch.randn(6, 4, generator=g), torch.randn(8, generator=g), \
        torch.randn(8, generator=g)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    x = torch.cat([answers, prompt_a.expand(6, 8)], dim=1)
    head, losses = train_head(x, y, "bce", lr=3e-2, epochs=20, batch_size=3, seed=0, linear_features=8)
    assert losses[-1] < losses[0] and head.linear.weight.abs().sum() > 0
    logits_a = head(x)
    logits_b = head(torch.cat([answers, prompt_b.expand(6, 8)], dim=1))
    offset = logits_b - logits_a
    assert not torch.allclose(offset, torch.zeros(6), atol=1e-4)  # the prompt matters ...
    assert torch.allclose(offset, offset[0].expand(6), atol=1e-5)  # ... by one shift per problem
    save_head(head, tmp_path / "orm", {})
    loaded, meta = load_head(tmp_path / "orm")
    assert meta["linear_features"] == 8 and torch.equal(loaded(x), logits_a.detach())
    with pytest.raises(ValueError, match="linear_features=12 must be in"):
        ScalarHead(12, linear_features=12)
