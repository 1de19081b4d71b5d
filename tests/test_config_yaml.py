"""Each default in one place: the schema (pipeline/config.py) holds every default; the YAML files
in conf/ hold only what differs from it, or say with a `pinned` comment why a value is repeated."""

from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path

import pytest
import yaml

from mcts.search import SearchParams
from pipeline.config import QstarConfig, SearchConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def schema_default(path: list[str]):
    node = QstarConfig()
    for key in path:
        node = getattr(node, key)
    return node.value if isinstance(node, Enum) else node


def leaves(data: dict, prefix: list[str]):
    for key, value in data.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from leaves(value, prefix + [key])
        else:
            yield prefix + [key], value


def repeated_defaults(path: Path) -> list[str]:
    """Keys whose value equals the schema default and whose line does not say `pinned`."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    group = path.parent.name
    prefix = [] if "@package _global_" in text or group == "conf" else [group]
    lines = text.splitlines()
    found = []
    for keys, value in leaves(data, prefix):
        default = schema_default(keys)
        if is_dataclass(default):
            continue
        if isinstance(default, list):
            default = [d.value if isinstance(d, Enum) else d for d in default]
        if value == default:
            line = next((ln for ln in lines if ln.strip().startswith(f"{keys[-1]}:")), "")
            if "pinned" not in line:
                found.append(".".join(keys))
    return found


YAML_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.name != "config.yaml")


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_holds_only_what_differs_from_the_schema(path):
    assert repeated_defaults(path) == []


def test_the_check_finds_a_repeated_default(tmp_path):
    group = tmp_path / "search"
    group.mkdir()
    (group / "x.yaml").write_text("c_puct: 1.0\nsimulations: 3\nalpha: 4.0  # pinned: why\n")
    assert repeated_defaults(group / "x.yaml") == ["search.c_puct"]


def test_search_defaults_come_from_mcts_search_params():
    config = SearchConfig()
    shared = {f.name for f in fields(SearchParams)}
    assert shared <= {f.name for f in fields(SearchConfig)}
    for name in shared:
        assert getattr(config, name) == getattr(SearchParams(), name), name
