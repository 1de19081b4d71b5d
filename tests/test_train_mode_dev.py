"""benchmarks/train_mode_dev.py on a tiny run: each mode trains from the iteration's policy on
its data, the run's own mode is reused, and every next policy is graded on dev only."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from pipeline.compose import compose_config
from pipeline.lm.models import resolve_model_path
from pipeline.loop import run_loop
from pipeline.run.atomic import write_jsonl
from pipeline.run.store import RunStore
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("train_mode")
    overrides = ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={root / 'cache'}",
                 "train=dpo_then_sft"]
    run_loop(compose_config(overrides), root / "run")
    # the tiny model solves nothing, so give the data stage's SFT file rows to train on
    data = root / "run" / "iter_000" / "data"
    shards = sorted((root / "run" / "iter_000" / "search").glob("shard_*.jsonl"))
    prompts = [json.loads(line)["prompt"] for line in shards[0].read_text().splitlines()]
    write_jsonl(data / "sft.jsonl", [{"prompt": p, "completion": "1 + 2 = 3\nAnswer: 3",
                                      "lineage": {}} for p in prompts])
    return root / "run", overrides


def test_each_mode_trains_and_is_graded_on_dev(tiny_run, tmp_path):
    bench = load_benchmark("train_mode_dev")
    run, overrides = tiny_run
    argv = ["--run", str(run), "--variant", "sft train.mode=sft",
            "--variant", "dpo_then_sft train.mode=dpo_then_sft", "--out", str(tmp_path / "out"),
            "--output", str(tmp_path / "result.json")]
    result = bench.main(argv)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["split"] == "dev" and result["run_mode"] == "dpo_then_sft"
    sft, own = result["variants"]["sft"], result["variants"]["dpo_then_sft"]
    store = RunStore(run)
    own_policy = store.policy_dir(1, resolve_model_path(compose_config(overrides).model))
    assert own["policy"] == own_policy  # the run's own next policy, not retrained
    assert sft["policy"] == str(tmp_path / "out" / "sft" / "policy")
    meta = json.loads((tmp_path / "out" / "sft" / "policy" / "meta.json").read_text())
    assert meta["config"]["mode"] == "sft" and meta["metrics"]["phases"] == ["sft"]
    dev = {p.id for p in make_task(compose_config(overrides).task).split("dev")}
    for name in ("sft_dev_greedy", "dpo_then_sft_dev_greedy", "start_dev_greedy"):
        graded = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert graded["summary"]["split"] == "dev" and {r["id"] for r in graded["rows"]} == dev
    # the run's own policy graded as the run's eval stage graded it
    stage = json.loads((run / "iter_000" / "eval" / "metrics.json").read_text())
    assert own["dev_greedy"] == stage["decodes"]["greedy"]["accuracy"]
    # resumable: nothing is trained or graded again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.json")}
    assert bench.main(argv) == result
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.json")} == stamps


def test_a_variant_may_only_change_train_keys(tiny_run, tmp_path):
    bench = load_benchmark("train_mode_dev")
    run, _ = tiny_run
    with pytest.raises(SystemExit) as exc:  # argparse: one line, exit code 2
        bench.main(["--run", str(run), "--variant", "bad search.simulations=4",
                    "--out", str(tmp_path / "out"), "--output", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # a value the schema refuses: one line, exit code 2
        bench.main(["--run", str(run), "--variant", "bad train.mode=sometimes",
                    "--out", str(tmp_path / "out"), "--output", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # GRPO samples its own data: refused before training
        bench.main(["--run", str(run), "--variant", "sft train.mode=sft",
                    "--variant", "g train.mode=grpo", "--out", str(tmp_path / "out"),
                    "--output", str(tmp_path / "r.json")])
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    rpo = bench.run_config_with(run, ["train.loss_type=[sigmoid,sft]"]).train
    assert [t.value for t in rpo.loss_type] == ["sigmoid", "sft"]
