"""Hydra config: every group option composes onto the typed schema; invalid values are refused
with a ConfigError naming the key."""

import json
from enum import Enum
from pathlib import Path

import pytest

from pipeline.compose import CONF_DIR, compose_config, expand_model_shorthand, group_options
from pipeline.config import (
    BestPath,
    ClusterKind,
    DecodeStrategy,
    MergeMethod,
    ModelConfig,
    QstarConfig,
    Selection,
    TaskKind,
    Termination,
    TrainConfig,
    TrainMode,
    to_dict,
)
from pipeline.errors import ConfigError, QstarError
from pipeline.lm import models
from pipeline.stages.trl_trainers import common_args
from pipeline.validation import validate

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def required_extras(group: str, option: str, jsonl_file) -> list[str]:
    if group == "model" and option == "hf":
        return ["model.name=some-org/some-model"]
    if group == "task" and option == "jsonl":
        return [f"task.path={jsonl_file}"]
    if group == "task" and option == "custom":
        return ["task.target=examples.countdown:Countdown"]
    return []


def test_every_group_is_known():
    # the groups config.yaml names (plus debug/experiment) all have at least one option
    assert {"model", "task", "decode", "search", "critics", "train", "cluster", "experiment",
            "debug"} <= set(GROUPS)
    for group in GROUPS:
        assert group_options(group), group


def assert_typed(cfg: QstarConfig):
    assert isinstance(cfg, QstarConfig)
    assert isinstance(cfg.model, ModelConfig)
    enums = [
        (cfg.task, "kind", TaskKind), (cfg.decode, "strategy", DecodeStrategy),
        (cfg.decode, "select", Selection), (cfg.search, "termination", Termination),
        (cfg.search, "merge", MergeMethod), (cfg.search, "best_path", BestPath),
        (cfg.train, "mode", TrainMode), (cfg.cluster, "kind", ClusterKind),
    ]
    for obj, name, enum in enums:
        assert isinstance(getattr(obj, name), enum), name
    for value, kind in ((cfg.search.simulations, int), (cfg.search.c_puct, float),
                        (cfg.train.beta, float), (cfg.iterations, int),
                        (cfg.critics.weights.rollout, float), (cfg.model.name, str),
                        (cfg.search.rollout.enabled, bool), (cfg.eval.decodes, list)):
        assert isinstance(value, kind) and not isinstance(value, Enum)
    json.dumps(to_dict(cfg))  # plain, JSON-ready


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group, jsonl_file):
    options = group_options(group)
    for option in options:
        cfg = compose_config([f"{group}={option}"] + required_extras(group, option, jsonl_file))
        assert_typed(cfg)
        # the option's own discriminating field is what it says
        if group == "decode":
            assert cfg.decode.strategy == DecodeStrategy(option)
        elif group == "task":
            assert cfg.task.kind == TaskKind(option)
        elif group == "train":
            assert cfg.train.mode == TrainMode(option)
        elif group == "cluster":
            assert cfg.cluster.kind == ClusterKind(option)


def test_model_options(jsonl_file, monkeypatch):
    monkeypatch.setattr(models, "native_bf16_cpu", lambda: False)
    assert compose_config([]).model.name == "smollm2-135m"
    hf = compose_config(["model=hf", "model.name=org/x"])
    assert hf.model.name == "org/x" and hf.model.dtype == "float32"
    gpu = compose_config(["model=cuda_bf16"])
    assert gpu.model.dtype == "bfloat16" and gpu.model.device.startswith("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_resolved_when_composed(monkeypatch, native):
    monkeypatch.setattr(models, "native_bf16_cpu", lambda: native)
    assert compose_config([]).model.dtype == ("bfloat16" if native else "float32")  # the demo: auto
    assert compose_config(["model.dtype=float32"]).model.dtype == "float32"
    assert compose_config(["model=cuda_bf16", "model.dtype=auto"]).model.dtype == "bfloat16"


def test_native_bf16_probe_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    assert models.native_bf16_cpu() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_cpu_training_stays_float32_whatever_the_model_dtype(tmp_path):
    for dtype in ("bfloat16", "float32"):
        args = common_args(TrainConfig(), ModelConfig(dtype=dtype), tmp_path, "none", 10, False)
        assert args["bf16"] is False and args["fp16"] is False and args["use_cpu"] is True
    gpu = common_args(TrainConfig(), ModelConfig(dtype="bfloat16", device="cuda"), tmp_path,
                      "none", 10, False)
    assert gpu["bf16"] is True and gpu["use_cpu"] is False


def test_experiment_gsm8k_gpu_overrides_groups():
    cfg = compose_config(["experiment=gsm8k_gpu"])
    assert cfg.task.kind == TaskKind.jsonl and cfg.task.path
    assert cfg.cluster.kind == ClusterKind.ray
    assert cfg.model.dtype == "bfloat16" and cfg.model.name != "smollm2-135m"


def test_combined_groups_compose(jsonl_file):
    cfg = compose_config(["debug=default", "decode=best_of_n", "task=jsonl",
                          f"task.path={jsonl_file}", "train=sft", "cluster=ray", "decode.n=3"])
    assert cfg.decode.strategy == DecodeStrategy.best_of_n and cfg.decode.n == 3
    assert cfg.task.path == str(jsonl_file) and cfg.train.mode == TrainMode.sft


def test_model_path_shorthand(tmp_path):
    path = str(tmp_path / "my-ckpt")
    assert expand_model_shorthand([f"model={path}"]) == ["model=hf", f"model.name={path}"]
    assert expand_model_shorthand(["model=cuda_bf16"]) == ["model=cuda_bf16"]
    cfg = compose_config([f"model={path}"])
    assert cfg.model.name == path and cfg.model.device == "cpu"
    hub = compose_config(["model=HuggingFaceTB/SmolLM2-360M-Instruct", "model.dtype=bfloat16"])
    assert hub.model.name == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert hub.model.dtype == "bfloat16"


def test_debug_group_shrinks_sizes():
    full, debug = compose_config([]), compose_config(["debug=default"])
    for path in ("task.num_train", "task.num_test", "decode.max_new_tokens", "decode.n",
                 "search.simulations", "search.max_option_tokens", "search.trees_per_batch",
                 "search.rollout.max_new_tokens", "critics.batch_size"):
        a, b = full, debug
        for part in path.split("."):
            a, b = getattr(a, part), getattr(b, part)
        assert b < a, path
    rows_per_step = [c.train.batch_size * c.train.gradient_accumulation_steps for c in (full, debug)]
    assert rows_per_step[1] < rows_per_step[0], rows_per_step
    assert debug.iterations <= full.iterations and debug.progress is False
    # debug keeps shrinking when another group is chosen too
    assert compose_config(["decode=best_of_n", "debug=default"]).decode.n == debug.decode.n


# ---------------------------------------------------------------- refused values


@pytest.mark.parametrize("overrides,key", [
    (["search.simulations=0"], "search.simulations"),
    (["search.simulations=-3"], "search.simulations"),
    (["search.c_min=4", "search.c_max=2"], "search.c_min"),
    (["search.root_c_min=6", "search.root_c_max=5"], "search.root_c_min"),
    (["train.beta=0"], "train.beta"),
    (["train.beta=-0.5"], "train.beta"),
    (["iterations=0"], "iterations"),
    (["critics.weights.rollout=0", "critics.weights.orm=0"], "critics.weights"),
    (["critics.trained_weights.value=0", "critics.trained_weights.prm=0",
      "critics.trained_weights.orm=0", "critics.trained_weights.rollout=0"],
     "critics.trained_weights"),
    (["critics.weights.value=-1"], "critics.weights"),
    (["decode.n=0"], "decode.n"),
    (["decode.top_p=1.5"], "decode.top_p"),
    (["model.dtype=int8"], "model.dtype"),
    (["eval.decodes=[greedy,nope]"], "eval.decodes"),
    (["task=jsonl"], "task.path"),
    (["task=arithmetic", "task.verify_steps=true"], "task.verify_steps"),
])
def test_out_of_range_values_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(overrides)


def test_wrong_type_refused():
    with pytest.raises(ConfigError) as exc:
        compose_config(["search.c_puct=abc"])
    assert "c_puct" in str(exc.value) and "abc" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="simulations"):
        compose_config(["search.simulations=many"])


def test_unknown_key_refused():
    with pytest.raises(ConfigError, match="foo"):
        compose_config(["search.foo=1"])
    with pytest.raises(ConfigError, match="not_a_key"):
        compose_config(["not_a_key=1"])


@pytest.mark.parametrize("group", ["task", "decode", "debug", "train"])
def test_unknown_group_option_lists_available(group):
    with pytest.raises(ConfigError) as exc:
        compose_config([f"{group}=no_such_option"])
    message = str(exc.value)
    assert "no_such_option" in message and "\n" not in message
    for option in group_options(group):
        assert option in message


@pytest.mark.parametrize("key,enum", [("search.termination", Termination),
                                      ("task.kind", TaskKind), ("decode.strategy", DecodeStrategy),
                                      ("search.merge", MergeMethod)])
def test_bad_enum_value_lists_allowed(key, enum):
    with pytest.raises(ConfigError) as exc:
        compose_config([f"{key}=bogus"])
    message = str(exc.value)
    assert "bogus" in message
    for member in enum:
        assert member.value in message


def test_config_error_is_a_qstar_error():
    assert issubclass(ConfigError, QstarError)


def test_validate_on_dataclasses_directly():
    cfg = QstarConfig()
    assert validate(cfg) is cfg
    cfg.search.c_min, cfg.search.c_max = 5, 2
    with pytest.raises(ConfigError, match=r"search\.c_min"):
        validate(cfg)


# Values that compose but are refused later, mid-search, with a ValueError/re.error traceback
# instead of a ConfigError naming the key (mcts.search.validate_params and OptionEnd check them;
# pipeline.config.validate does not).
@pytest.mark.parametrize("overrides,key", [
    (["search.alpha=-1"], "search.alpha"),
    (["search.virtual_loss=-1"], "search.virtual_loss"),
    (["search.termination=step_marker", "search.step_regex='('"], "search.step_regex"),
])
def test_values_the_search_refuses_are_refused_at_config_time(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(overrides)
