"""The self-play loop end to end on the tiny model: artifacts, crash + resume, sweeps, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import loop as loop_module
from pipeline.compose import compose_config, load_run_config
from pipeline.errors import ConfigError, QstarError
from pipeline.loop import resume_run, run_loop
from pipeline.run.store import STAGES, RunStore
from pipeline.tasks import make_task
from pipeline.tasks.base import problems_digest

QSTAR = str(Path(sys.executable).parent / "qstar")


def loop_overrides(debug_overrides, *extra) -> list[str]:
    # 4 training problems in 2 shards, so a crash can land between shards.
    return debug_overrides + ["search.trees_per_batch=2", "train.learning_rate=1e-3", *extra]


def counts(run: Path) -> dict:
    """What a complete run must have, independent of timing."""
    store = RunStore(run)
    result = {"stages": sorted(store.manifest["stages"])}
    for i in range(store.manifest["iterations"]):
        shards = sorted((run / f"iter_{i:03d}/search").glob("shard_*.jsonl"))
        result[f"trees_{i}"] = sum(len(p.read_text().splitlines()) for p in shards)
        for name in ("dpo", "sft"):
            path = run / f"iter_{i:03d}/data/{name}.jsonl"
            result[f"{name}_{i}"] = len(path.read_text().splitlines())
        result[f"critics_{i}"] = sorted(p.name for p in (run / f"iter_{i:03d}/refit").iterdir())
        result[f"policy_{i}"] = (run / f"iter_{i:03d}/train/policy/config.json").exists()
    return result


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted 1-iteration run to compare resumed runs against."""
    root = tmp_path_factory.mktemp("reference")
    overrides = loop_overrides(["debug=default", f"model={tiny_model_dir}",
                                f"model.cache_dir={root / 'cache'}"])
    run_loop(compose_config(overrides), root / "run")
    return root / "run", overrides


def test_run_completes_every_stage_with_its_artifacts(reference_run):
    run, _ = reference_run
    store = RunStore(run)
    expected = ["iter_000/baseline"] + [f"iter_000/{s}" for s in STAGES]
    assert sorted(store.manifest["stages"]) == sorted(expected)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(expected)
    c = counts(run)
    assert c["trees_0"] == 4
    assert c["critics_0"] == ["metrics.json", "orm", "prm", "value"]
    assert (run / "iter_000/eval/metrics.json").exists()
    assert (run / "plots/accuracy.png").stat().st_size > 0
    train = store.metrics(0, "train")
    if not train.get("skipped"):  # a trained policy loads back and is the next policy
        assert c["policy_0"] and store.policy_dir(1, "base") == str(run / train["policy_dir"])
        assert train["policy_dir"] == "iter_000/train/policy"  # relative: the run can move
    # Nothing half-written is left behind.
    assert not list(run.rglob(".tmp-*"))


def test_loop_searches_train_and_evaluates_dev_never_test(reference_run):
    run, overrides = reference_run
    task = make_task(compose_config(overrides).task)
    dev, test = [p.id for p in task.split("dev")], {p.id for p in task.split("test")}
    for stage in ("baseline", "eval"):  # the per-iteration eval is a tuning signal: dev
        assert json.loads((run / f"iter_000/{stage}/metrics.json").read_text())["split"] == "dev"
        rows = json.loads((run / f"iter_000/{stage}/greedy.json").read_text())["rows"]
        assert [r["id"] for r in rows] == dev
    searched = {json.loads(line)["problem_id"]
                for shard in (run / "iter_000/search").glob("shard_*.jsonl")
                for line in shard.read_text().splitlines()}
    assert searched == {p.id for p in task.split("train")}
    assert not (searched | set(dev)) & test


# wall-clock readings, which two runs never share
TIMING_KEYS = ("seconds", "per_s", "per_second", "runtime", "finished", "created", "peak_rss_mb")


def content(path: Path, run: Path):
    """A JSON or JSONL artifact without its wall-clock readings, its run's path made generic."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not k.endswith(TIMING_KEYS)}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x.replace(str(run), "RUN") if isinstance(x, str) else x

    text = path.read_text()
    rows = text.splitlines() if path.suffix == ".jsonl" else [text]
    return [clean(json.loads(row)) for row in rows]


def artifacts(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix in (".json", ".jsonl", ".safetensors"))


def test_a_second_run_at_the_same_seed_writes_the_same_artifacts(reference_run, tmp_path):
    """The same config in another process, with another string-hash seed: the same trees, rows,
    weights, grades and metrics, but for wall times and the run's own path."""
    reference, overrides = reference_run
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONHASHSEED="12345")
    proc = subprocess.run([QSTAR, "run", *overrides, f"hydra.run.dir={run}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = artifacts(reference)
    assert files == artifacts(run) and any(f.suffix == ".safetensors" for f in files)
    for rel in files:
        if rel.suffix == ".safetensors":
            assert (reference / rel).read_bytes() == (run / rel).read_bytes(), rel
        else:
            assert content(reference / rel, reference) == content(run / rel, run), rel


@pytest.mark.parametrize("stage", STAGES)
def test_crash_in_any_stage_then_resume_matches_uninterrupted(stage, reference_run, tmp_path,
                                                              monkeypatch):
    reference, overrides = reference_run
    run = tmp_path / "run"
    real = loop_module.STAGE_RUNNERS[stage]

    def crash(loop, i):
        if stage == "search":  # crash after the first shard is written
            jobs_seen = []
            original = loop.cluster.map_actors

            def one_then_die(worker_cls, jobs, *args, **kwargs):
                jobs_seen.extend(jobs)
                original(worker_cls, jobs[:1], *args, **kwargs)
                raise RuntimeError("killed mid-search")

            loop.cluster.map_actors = one_then_die
            real(loop, i)
        raise RuntimeError(f"killed in {stage}")

    monkeypatch.setitem(loop_module.STAGE_RUNNERS, stage, crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_loop(compose_config(overrides), run)
    assert not RunStore(run).done(0, stage)
    if stage == "search":
        assert len(list((run / "iter_000/search").glob("shard_*.jsonl"))) == 1
    monkeypatch.setitem(loop_module.STAGE_RUNNERS, stage, real)
    resume_run(str(run), [])
    assert counts(run) == counts(reference)


def test_resume_extends_iterations_and_refuses_other_changes(reference_run, tmp_path):
    """The run is moved first, and its original is out of reach: nothing may point there."""
    import shutil

    reference, _ = reference_run
    run = tmp_path / "moved" / "run"
    shutil.copytree(reference, run)
    for text in [(run / "manifest.json").read_text(),
                 *(p.read_text() for p in run.glob("iter_000/refit/*/meta.json"))]:
        assert str(reference) not in text
    trained = not RunStore(run).metrics(0, "train").get("skipped")
    assert json.loads((run / "iter_000/refit/value/meta.json").read_text())["backbone"] == (
        "../train/policy" if trained else RunStore(run).manifest["config"]["model"]["name"])
    with pytest.raises(ConfigError, match=r"search\.c_puct cannot change on resume"):
        resume_run(str(run), ["search.c_puct=2.0"])
    hidden = reference.with_name("run.hidden")
    reference.rename(hidden)
    try:
        resume_run(str(run), ["iterations=2"])
    finally:
        hidden.rename(reference)
    store = RunStore(run)
    policy_2 = store.policy_ref(2, store.manifest["config"]["model"]["name"])  # refit's backbone
    assert json.loads((run / "iter_001/refit/value/meta.json").read_text())["backbone"] == (
        os.path.relpath(run / policy_2, run / "iter_001/refit") if store.in_run(policy_2) else policy_2)
    assert store.done(1, "eval") and store.manifest["iterations"] == 2
    assert (run / "iter_001/search/shard_0000.jsonl").exists()


def test_resume_refuses_problems_the_run_did_not_start_with(reference_run, tmp_path,
                                                              monkeypatch):
    """A task whose generator (or data file) changed makes other problems under the same ids:
    resuming on them is one line, and the run is left as it was."""
    import shutil

    import pipeline.tasks.reasoning_gym as reasoning_gym

    reference, _ = reference_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    manifest = json.loads((run / "manifest.json").read_text())
    task = make_task(load_run_config(run, []).task)
    assert manifest["problems"] == {"train": problems_digest(task.split("train")),
                                    "dev": problems_digest(task.split("dev"))}
    before = (run / "manifest.json").read_bytes()
    monkeypatch.setattr(reasoning_gym, "generation_seed", lambda seed: 12345)  # a new generator
    with pytest.raises(QstarError, match=r"train problems are not the ones this run started with"):
        resume_run(str(run), ["iterations=2"])
    assert (run / "manifest.json").read_bytes() == before and not (run / "iter_001").exists()
    monkeypatch.undo()
    # a run from before digests were recorded resumes, and records them
    del manifest["problems"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    resume_run(str(run), [])
    assert RunStore(run).manifest["problems"] == json.loads(before)["problems"]


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(QstarError, match="not a qstar run directory"):
        resume_run(str(tmp_path), [])


def test_manifest_from_another_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 999, "stages": {}}))
    with pytest.raises(QstarError, match="manifest version 999"):
        RunStore(tmp_path)


def test_lock_refuses_a_second_process(tmp_path):
    store = RunStore(tmp_path)
    with store.lock():
        code = ("from pipeline.run.store import RunStore\n"
                f"with RunStore({str(tmp_path)!r}).lock(): pass\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "is in use by pid" in proc.stderr


def test_lock_removes_what_a_killed_writer_left(tmp_path):
    from pipeline.run.atomic import atomic_dir, write_json

    store = RunStore(tmp_path)
    search = tmp_path / "iter_000" / "search"
    search.mkdir(parents=True)
    (search / ".tmp-shard_0000.jsonl-abc").write_text('{"half": ')
    (search / "shard_0001.jsonl").write_text("{}\n")
    partial = tmp_path / "iter_000" / "train" / ".tmp-policy-xyz"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / ".tmp-model.safetensors-1").write_text("x")
    with store.lock():
        assert not (search / ".tmp-shard_0000.jsonl-abc").exists() and not partial.exists()
        assert (search / "shard_0001.jsonl").read_text() == "{}\n"
        write_json(tmp_path / "a.json", {"ok": 1})  # writing under the lock still works
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    assert sorted(p.name for p in tmp_path.rglob(".tmp-*")) == []
    assert (tmp_path / "d" / "f").read_text() == "y"


def test_sweep_makes_one_run_per_value_and_inspect_compares_them(tiny_model_dir, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    args = [QSTAR, "run", "-m", "debug=default", f"model={tiny_model_dir}",
            f"model.cache_dir={tmp_path / 'cache'}", "search.c_puct=0.5,2.0",
            "eval.decodes=[greedy]", "critics.enabled=false"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweeps = list((tmp_path / "runs/multirun").glob("*/*"))
    assert len(sweeps) == 1
    runs = sorted(p for p in sweeps[0].iterdir() if (p / "manifest.json").exists())
    assert len(runs) == 2
    c_puct = [RunStore(r).manifest["config"]["search"]["c_puct"] for r in runs]
    assert sorted(c_puct) == [0.5, 2.0]
    table = subprocess.run([QSTAR, "inspect", str(sweeps[0])], env=env, capture_output=True,
                           text=True)
    assert table.returncode == 0
    assert "search.c_puct=0.5" in table.stdout and "search.c_puct=2.0" in table.stdout


def test_the_sweep_objective_is_the_last_policys_first_decode(tmp_path):
    """What `qstar run -m` hands Hydra's sweeper (optuna maximises it): the last iteration's
    eval accuracy under eval.decodes[0], not an earlier iteration's or another decode's."""
    store = RunStore(tmp_path / "run")
    grades = {"greedy": {"accuracy": 0.25}, "best_of_n": {"accuracy": 0.5}}
    store.complete(0, "baseline", {"decodes": {"greedy": {"accuracy": 0.1}}}, 1.0)
    store.complete(0, "eval", {"decodes": {"greedy": {"accuracy": 0.2}}}, 1.0)
    store.complete(1, "eval", {"decodes": grades}, 1.0)
    cfg = compose_config(["iterations=2", "eval.decodes=[greedy,best_of_n]"])
    assert loop_module.final_accuracy(store, cfg) == 0.25
    cfg.eval.decodes = ["best_of_n", "greedy"]
    assert loop_module.final_accuracy(store, cfg) == 0.5
    cfg.eval.decodes, cfg.iterations = ["greedy"], 1
    assert loop_module.final_accuracy(store, cfg) == 0.2
    cfg.iterations = 0  # no iteration: the base policy's baseline
    assert loop_module.final_accuracy(store, cfg) == 0.1
    cfg.eval.decodes = []  # a run that graded nothing has no objective
    assert loop_module.final_accuracy(store, cfg) is None


def test_inspect_prints_the_table_and_one_tree(reference_run, capsys):
    from pipeline.cli import main

    run, _ = reference_run
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "acc:greedy" in out and out.count("\n") >= 3
    problem = json.loads((run / "iter_000/search/shard_0000.jsonl").read_text().splitlines()[0])
    assert main(["inspect", str(run), "--iter", "0", "--problem", problem["problem_id"]]) == 0
    out = capsys.readouterr().out
    assert f"problem {problem['problem_id']}" in out and "N=" in out and "Q=" in out
    html_files = list((run / "inspect").glob("tree_iter0_*.html"))
    assert html_files and "<ul>" in html_files[0].read_text()
    assert main(["inspect", str(run), "--iter", "0", "--problem", "nope"]) == 2


def test_ray_cluster_runs_the_loop(tiny_model_dir, tmp_path, ray_session):
    overrides = loop_overrides(["debug=default", f"model={tiny_model_dir}",
                                f"model.cache_dir={tmp_path / 'cache'}"],
                               "cluster=ray", "cluster.search_workers=2",
                               "cluster.worker_num_cpus=0.5", "eval.decodes=[greedy]")
    store = run_loop(compose_config(overrides), tmp_path / "run")
    assert store.done(0, "eval")
    assert counts(tmp_path / "run")["trees_0"] == 4


def test_resume_accepts_a_cluster_preset(reference_run, tmp_path):
    import shutil

    from pipeline.compose import load_run_config

    reference, _ = reference_run
    shutil.copytree(reference, tmp_path / "run")
    cfg = load_run_config(tmp_path / "run", ["cluster=ray"])
    assert cfg.cluster.kind.value == "ray" and cfg.cluster.search_workers == 2
    with pytest.raises(ConfigError, match="task cannot change on resume"):
        load_run_config(tmp_path / "run", ["task=jsonl"])
