"""From command-line overrides to a validated `QstarConfig`, through Hydra's compose API.

`@hydra.main` lives only in pipeline/cli.py (for `qstar run`, which needs Hydra's run dir and
sweeps); everything else — `qstar eval`, `qstar resume`, tests — composes here.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import QstarConfig
from pipeline.errors import ConfigError
from pipeline.lm.models import resolved_dtype
from pipeline.run.store import RunStore
from pipeline.validation import validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ConfigStore.instance().store(name="qstar_schema", node=QstarConfig)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def expand_model_shorthand(overrides: list[str]) -> list[str]:
    """`model=<hub id or path>` is shorthand for `model=hf model.name=<it>`."""
    presets = group_options("model")
    result = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") == "model" and value not in presets and "," not in value:
            result += ["model=hf", f"model.name={value}"]
        else:
            result.append(item)
    return result


def to_config(dcfg: DictConfig) -> QstarConfig:
    """DictConfig (validated against the schema by Hydra) -> dataclasses, range-checked."""
    try:
        cfg = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None
    cfg = validate(cfg)
    cfg.model.dtype = resolved_dtype(cfg.model)  # auto -> what this machine runs
    return cfg


def compose_config(overrides: list[str] | None = None) -> QstarConfig:
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            dcfg = compose(config_name="config", overrides=expand_model_shorthand(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(one_line(exc)) from None
    return to_config(dcfg)


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span lines and chained causes; keep the lines that explain."""
    parts, seen = [], set()
    if isinstance(exc, OverrideParseException):  # the override it could not parse, by name
        parts.append(f"cannot parse the override {exc.override!r}:")
    while exc is not None:
        for line in str(exc).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            noise = line.startswith(("full_key:", "object_type", "reference_type", "Set the ",
                                     "To append", "provider=")) or "$VALUE" in line
            if line and line != "None" and not noise and line not in seen:
                seen.add(line)
                parts.append(line)
        exc = exc.__cause__ or exc.__context__
    return " ".join(parts).replace(":; ", ": ") or "invalid config"


# Keys a resume may change: none of them alters what completed stages computed.
RESUMABLE = ("iterations", "progress", "cluster", "tracking")


def recorded_config(run_dir: Path) -> DictConfig:
    """The config a run recorded in its manifest, on the schema."""
    stored = RunStore(run_dir).manifest.get("config")
    if not stored:
        raise ConfigError(f"{run_dir}/manifest.json records no config; cannot resume it")
    if "num_heldout" in stored.get("task", {}):
        raise ConfigError(f"{run_dir} was made before the train/dev/test splits (it records "
                          "task.num_heldout); start a new run instead of resuming it")
    return OmegaConf.merge(OmegaConf.structured(QstarConfig), stored)


def load_run_config(run_dir: Path, overrides: list[str]) -> QstarConfig:
    """The config a run recorded in its manifest, plus the few overrides a resume allows."""
    base = recorded_config(run_dir)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep:
            raise ConfigError(f"resume override {item!r}: expected KEY=VALUE, e.g. iterations=3")
        if key.split(".")[0] not in RESUMABLE:
            old = OmegaConf.select(base, key, default="<unset>")
            raise ConfigError(
                f"{key} cannot change on resume: completed stages used {key}={old}; "
                f"a resume may change only {', '.join(RESUMABLE)} (start a new run instead)")
    try:
        merged = OmegaConf.merge(base, *[_resume_override(item) for item in overrides])
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None
    return to_config(merged)


def _resume_override(item: str):
    """`cluster=ray` picks the group preset, as on `qstar run`; `key=value` sets one key."""
    key, _, value = item.partition("=")
    if key in RESUMABLE and value in group_options(key):
        return OmegaConf.create({key: OmegaConf.load(CONF_DIR / key / f"{value}.yaml")})
    return OmegaConf.from_dotlist([item])
