"""Reliability and security of a run: kill -9 at random moments then `qstar resume`, partial
files never taken for complete, Ray workers that die, and what a run may write (no pickles,
nothing outside the run directory and the cache, trust_remote_code off unless set).

The runs use a tiny model *taught* to answer "Answer: 5" or "Answer: 6" about half the time each,
on a JSONL task whose gold answer is 5: every tree then has right and wrong leaves, so the data
stage makes DPO pairs and the train stage really trains (with the untaught random tiny model
there are no pairs and the train stage is skipped in milliseconds, so a kill "in train" would
test nothing). The kill delay is seeded (QSTAR_KILL_SEED, default 0) and drawn within the
stage's duration in the reference run (at most 1.5 s), so the kill lands inside that stage.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.run.atomic import read_jsonl
from pipeline.run.store import BASELINE, STAGES, RunStore

REPO = Path(__file__).resolve().parents[1]
QSTAR = str(Path(sys.executable).parent / "qstar")
KILL_SEED = int(os.environ.get("QSTAR_KILL_SEED", "0"))
ALL_STAGES = sorted([f"iter_000/{BASELINE}"] + [f"iter_000/{s}" for s in STAGES])


@pytest.fixture
def one_thread():
    """On a loaded 2-core machine torch's 2 intra-op threads make the tiny model ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the taught model and task


def teach_tiny_model(source: Path, target: Path, steps: int = 60) -> Path:
    """Copy the tiny model and fit it (a few seconds) to answer 'Answer: 5' or 'Answer: 6'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tasks.prompt import to_messages

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    examples = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template(to_messages(question), tokenize=False,
                                               add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for answer in (5, 6):
            c = tokenizer(f"Answer: {answer}<|im_end|>", add_special_tokens=False)["input_ids"]
            examples.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in examples)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(x)) + x for x, _ in examples])
    labels = torch.tensor([[-100] * (width - len(y)) + y for _, y in examples])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(target)
    return target


QUESTIONS = [f"What is {a} plus {b}?" for a, b in
             [(1, 4), (2, 3), (3, 2), (4, 1), (0, 5), (5, 0), (1, 5), (2, 4), (3, 3), (4, 2)]]


def write_task(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": f"{q} #### 5"}) + "\n"
                            for q in QUESTIONS))
    return path


def run_overrides(model: Path, data: Path, root: Path) -> list[str]:
    return ["debug=default", f"model={model}", f"model.cache_dir={root / 'cache'}",
            "search.trees_per_batch=2", "train.learning_rate=1e-3", "eval.decodes=[greedy]",
            "task=jsonl", f"task.path={data}", "task.num_dev=3", "task.num_test=3",
            "search.merge=none", "search.max_option_tokens=16"]


def qstar_env(**extra) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("taught")
    return teach_tiny_model(tiny_model_dir, root / "model"), write_task(root / "data.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, taught):
    """One uninterrupted `qstar run` (subprocess) with HOME, cwd and TMPDIR inside a fresh tmp
    directory and wandb offline, so the security tests can list every file it created."""
    model, data = taught
    root = tmp_path_factory.mktemp("reference")
    for name in ("home", "cwd", "tmp"):
        (root / name).mkdir()
    before = files_under(root)
    env = qstar_env(HOME=str(root / "home"), TMPDIR=str(root / "tmp"))
    env.pop("WANDB_MODE")  # tracking.wandb_mode=offline: wandb's files must stay in the run too
    # eval.output is `qstar eval`'s output path; `qstar run` must not write there either
    args = [QSTAR, "run", f"hydra.run.dir={root / 'cwd/run'}", *run_overrides(model, data, root),
            "tracking.wandb_mode=offline", f"eval.output={root / 'escape/eval.json'}"]
    proc = subprocess.run(args, cwd=root / "cwd", env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    created = sorted(p.relative_to(root) for p in files_under(root) - before)
    return {"root": root, "run": root / "cwd/run", "created": created,
            "counts": counts(root / "cwd/run")}


def counts(run: Path) -> dict:
    """What a complete 1-iteration run must have, independent of timing."""
    store = RunStore(run)
    search = run / "iter_000/search"
    shards = sorted(search.glob("shard_*.jsonl"))
    rows = [read_jsonl(p) for p in shards]  # each parses fully, line by line
    train = store.metrics(0, "train") or {}
    return {
        "stages": sorted(store.manifest["stages"]),
        "metrics_lines": len((run / "metrics.jsonl").read_text().splitlines()),
        "shards": [p.name for p in shards],
        "trees": sum(len(r) for r in rows),
        "problems": sorted(row["problem_id"] for r in rows for row in r),
        "dpo": len(read_jsonl(run / "iter_000/data/dpo.jsonl")),
        "sft": len(read_jsonl(run / "iter_000/data/sft.jsonl")),
        "critics": (store.metrics(0, "critics") or {}).get("skipped", "fitted"),
        "refit": sorted(p.name for p in (run / "iter_000/refit").glob("*")),
        "trained": not train.get("skipped"),
        "baseline": store.metrics(0, BASELINE)["decodes"]["greedy"]["correct"],
    }


def test_reference_run_trains_on_real_pairs(reference):
    c = reference["counts"]
    assert c["stages"] == ALL_STAGES and c["metrics_lines"] == len(ALL_STAGES)
    assert c["trees"] == 4 and c["shards"] == ["shard_0000.jsonl", "shard_0001.jsonl"]
    assert c["dpo"] > 0 and c["sft"] > 0 and c["trained"], c  # the train stage is not skipped
    assert "refit stage fits the heads" in c["critics"]  # deferred: fitted once, after train
    assert c["refit"] == ["metrics.json", "orm", "prm", "value"]  # heads on the trained policy


# ---------------------------------------------------------------- kill -9, then resume


def assert_consistent(run: Path) -> None:
    """What must hold at *any* moment: a readable manifest, and every stage it lists complete."""
    store = RunStore(run)  # parses, right version
    for path in (run / "iter_000/search").glob("shard_*.jsonl"):
        read_jsonl(path)  # a shard exists only complete
    done = set(store.manifest["stages"])
    if "iter_000/search" in done:
        assert sum(len(read_jsonl(p)) for p in (run / "iter_000/search").glob("shard_*")) == 4
    for stage in ("critics", "refit"):
        if f"iter_000/{stage}" in done and not store.metrics(0, stage).get("skipped"):
            assert (run / f"iter_000/{stage}/metrics.json").is_file()
            for kind in ("value", "prm", "orm"):
                assert (run / f"iter_000/{stage}/{kind}/head.safetensors").is_file()
    if "iter_000/data" in done:
        read_jsonl(run / "iter_000/data/dpo.jsonl")
        read_jsonl(run / "iter_000/data/sft.jsonl")
    if "iter_000/train" in done and not store.metrics(0, "train").get("skipped"):
        assert (run / store.metrics(0, "train")["policy_dir"] / "meta.json").is_file()
    for key in ("iter_000/baseline", "iter_000/eval"):
        if key in done:
            json.loads((run / key / "metrics.json").read_text())


def assert_complete_like(run: Path, reference: dict) -> None:
    assert counts(run) == reference["counts"]
    store = RunStore(run)
    train = store.metrics(0, "train")
    if not train.get("skipped"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        policy = run / train["policy_dir"]
        assert policy == run / "iter_000/train/policy"
        AutoModelForCausalLM.from_pretrained(policy)
        AutoTokenizer.from_pretrained(policy)
        assert json.loads((policy / "meta.json").read_text())["rows"]["dpo"] == counts(run)["dpo"]
    # A killed writer may leave `.tmp-*` behind; no reader may take one for complete.
    from pipeline.run.store import load_shards
    from pipeline.stages.train import _last_checkpoint

    assert len(load_shards(run / "iter_000/search")) == 4
    trainer = run / "iter_000/train/trainer/dpo"
    assert _last_checkpoint(trainer) is None or ".tmp-" not in _last_checkpoint(trainer)


class Watcher:
    """Reads a child's stderr on a thread; `wait_for` blocks until a line starts with a text."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.cond = proc, [], threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # EOF
            self.cond.notify_all()

    def wait_for(self, prefix: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if any(line is not None and line.startswith(prefix) for line in self.lines):
                    return True
                if None in self.lines or time.monotonic() > deadline:
                    return False
                self.cond.wait(timeout=1.0)

    def text(self) -> str:
        self.thread.join(timeout=30)
        return "".join(line for line in self.lines if line is not None)


@pytest.mark.parametrize("stage", ["search", "train", "refit", "eval"])  # critics: deferred to refit
def test_kill_9_in_a_stage_then_resume_completes(stage, reference, taught, tmp_path):
    model, data = taught
    run = tmp_path / "run"
    stage_seconds = RunStore(reference["run"]).manifest["stages"][f"iter_000/{stage}"]["seconds"]
    delay = random.Random(f"{KILL_SEED}-{stage}").uniform(0.0, min(1.5, max(stage_seconds, 0.05)))
    args = [QSTAR, "run", f"hydra.run.dir={run}", *run_overrides(model, data, tmp_path)]
    proc = subprocess.Popen(args, cwd=tmp_path, env=qstar_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    watcher = Watcher(proc)
    try:
        reached = watcher.wait_for(f"qstar: iteration 0 {stage} ...", timeout=300)
        assert reached, f"never reached {stage}:\n{watcher.text()[-3000:]}"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = watcher.text()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill ({delay:.2f}s):\n{log}"
    assert_consistent(run)  # the state a kill leaves is consistent before any repair
    killed_at = sorted(RunStore(run).manifest["stages"])
    resumed = subprocess.run([QSTAR, "resume", str(run)], cwd=tmp_path, env=qstar_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (killed_at, resumed.stderr[-3000:])
    assert "Traceback" not in resumed.stderr
    assert_complete_like(run, reference)
    leftovers = sorted(str(p.relative_to(run)) for p in run.rglob(".tmp-*"))
    print(f"killed {delay:.3f}s into {stage}; stages done then: {killed_at}; "
          f"temp leftovers: {leftovers}")


# ---------------------------------------------------------------- partial files


def copy_run(reference: dict, target: Path, keep: tuple[str, ...]) -> Path:
    """A copy of the reference run whose manifest lists only `keep` (as if stopped there)."""
    shutil.copytree(reference["run"], target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items()
                          if k.split("/")[1] in keep}
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def trees_of(shard: Path | str) -> list[dict]:
    """A shard's rows without the timing (stats.seconds)."""
    text = shard.read_text() if isinstance(shard, Path) else shard
    rows = [json.loads(line) for line in text.splitlines()]
    for row in rows:
        row["tree"]["stats"].pop("seconds", None)
    return rows


def test_partial_temp_files_are_never_taken_for_complete(reference, tmp_path, capsys,
                                                          one_thread):
    from pipeline.cli import main

    run = copy_run(reference, tmp_path / "run", keep=(BASELINE,))
    search = run / "iter_000/search"
    for name in ("data", "train", "refit", "eval"):  # the critics stage left no directory
        shutil.rmtree(run / "iter_000" / name)
    full_shard = (search / "shard_0001.jsonl").read_bytes()
    (search / "shard_0001.jsonl").unlink()
    # What a writer killed mid-write leaves: a truncated shard and half a manifest, as temps.
    partial_shard = search / ".tmp-shard_0001.jsonl-k1ll3d"
    partial_shard.write_bytes(full_shard[: len(full_shard) // 2])
    half_manifest = run / ".tmp-manifest.json-k1ll3d"
    half_manifest.write_text((run / "manifest.json").read_text()[:40])
    partial_policy = run / "iter_000/train/.tmp-policy-k1ll3d"
    partial_policy.mkdir(parents=True)
    (partial_policy / "config.json").write_text("{")
    assert main(["resume", str(run)]) == 0, capsys.readouterr().err
    assert_complete_like(run, reference)
    # The resumed search redid shard 1 (the same trees: seeded); the temps were deleted when
    # the resume took the run's lock, before anything could read them.
    assert trees_of(search / "shard_0001.jsonl") == trees_of(full_shard.decode())
    assert not partial_shard.exists() and not half_manifest.exists() and not partial_policy.exists()
    assert list(run.rglob(".tmp-*")) == []


def test_metrics_jsonl_follows_the_manifest_after_a_kill_between_the_two_writes(
        reference, tmp_path, one_thread):
    """`complete` replaces manifest.json, then metrics.jsonl; a kill in between leaves the
    last stage out of metrics.jsonl. A resume must bring it back in line with the manifest."""
    from pipeline.loop import resume_run

    run = copy_run(reference, tmp_path / "run", keep=(BASELINE, *STAGES))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    resume_run(str(run), [])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(ALL_STAGES)
    assert counts(run) == reference["counts"]


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(reference, tmp_path, one_thread):
    from pipeline.loop import resume_run

    run = copy_run(reference, tmp_path / "run", keep=(BASELINE, "search", "critics", "data"))
    train = run / "iter_000/train"
    shutil.rmtree(train / "policy")
    shutil.rmtree(run / "iter_000/eval")
    partial = train / "trainer/dpo/checkpoint-2"  # killed while TRL was saving it
    partial.mkdir(parents=True)
    shutil.copy(reference["run"] / "iter_000/train/policy/config.json", partial)
    weights = (reference["run"] / "iter_000/train/policy/model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[:100])
    resume_run(str(run), [])
    assert_complete_like(run, reference)


# ---------------------------------------------------------------- Ray worker failure


def faulty_make_task(marker: Path, always: bool):
    """make_task whose task kills the Ray worker process (os._exit) when it grades in a worker:
    once (the first call anywhere, recorded in `marker`) or every time. The driver never dies."""
    from pipeline import tasks

    driver = os.getpid()

    def make(cfg):
        task = tasks.make_task(cfg)

        class DyingTask(type(task)):  # defined here, so Ray pickles it by value
            def is_correct(self, problem, completion):
                if os.getpid() != driver and (always or not marker.exists()):
                    with open(marker, "a") as f:
                        f.write(f"{os.getpid()}\n")
                    os._exit(1)
                return super().is_correct(problem, completion)

        task.__class__ = DyingTask
        return task

    return make


def dying_once(fn, marker: Path):
    """`fn`, but the first call in a Ray worker process kills that process (os._exit)."""
    driver = os.getpid()

    def wrapper(*args, **kwargs):
        if os.getpid() != driver and not marker.exists():
            marker.write_text(f"{os.getpid()}\n")
            os._exit(1)
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    return wrapper


def ray_overrides(debug_overrides, *extra) -> list[str]:
    return [*debug_overrides, "search.trees_per_batch=2", "eval.decodes=[greedy]",
            "cluster=ray", "cluster.search_workers=1", "cluster.worker_num_cpus=1", *extra]


def test_ray_search_actor_and_critic_task_killed_mid_batch_are_retried(
        debug_overrides, tmp_path, monkeypatch, ray_session, one_thread):
    from pipeline import loop as loop_module
    from pipeline.compose import compose_config
    from pipeline.stages import critics as critics_stage

    search_died, critics_died = tmp_path / "search-died", tmp_path / "critics-died"
    monkeypatch.setattr(loop_module, "make_task", faulty_make_task(search_died, always=False))
    monkeypatch.setattr(critics_stage, "fit_critics",
                        dying_once(critics_stage.fit_critics, critics_died))
    store = loop_module.run_loop(compose_config(ray_overrides(debug_overrides)), tmp_path / "run")
    assert len(search_died.read_text().splitlines()) == 1  # the search actor did die, once
    assert len(critics_died.read_text().splitlines()) == 1  # so did the critics (refit) task
    assert not store.metrics(0, "refit").get("skipped")
    assert sorted(store.manifest["stages"]) == ALL_STAGES
    rows = [read_jsonl(p) for p in sorted((tmp_path / "run/iter_000/search").glob("shard_*"))]
    assert len(rows) == 2 and sum(map(len, rows)) == 4


def test_ray_worker_that_always_dies_ends_the_run_clearly_and_it_resumes(
        debug_overrides, tmp_path, monkeypatch, ray_session, one_thread):
    from pipeline import loop as loop_module
    from pipeline.compose import compose_config
    from pipeline.errors import QstarError

    marker = tmp_path / "died"
    run = tmp_path / "run"
    monkeypatch.setattr(loop_module, "make_task", faulty_make_task(marker, always=True))
    cfg = compose_config(ray_overrides(debug_overrides, "cluster.max_restarts=1"))
    with pytest.raises(QstarError) as info:
        loop_module.run_loop(cfg, run)
    message = str(info.value)
    assert "\n" not in message
    assert "search worker failed after 1 restarts" in message and "resumable" in message
    print("error:", message)
    assert len(marker.read_text().splitlines()) == 2  # first life + one restart
    store = RunStore(run)  # the manifest is valid: baseline done, search not
    assert sorted(store.manifest["stages"]) == [f"iter_000/{BASELINE}"]
    assert not list((run / "iter_000/search").glob("shard_*.jsonl"))
    monkeypatch.undo()  # the fault is gone; the run goes on from where it stopped
    loop_module.resume_run(str(run), ["cluster.kind=local"])
    assert sorted(RunStore(run).manifest["stages"]) == ALL_STAGES
    assert sum(len(read_jsonl(p)) for p in (run / "iter_000/search").glob("shard_*")) == 4


# ---------------------------------------------------------------- security


ALLOWED_SUFFIXES = {".json", ".jsonl", ".safetensors", ".yaml", ".png", ".txt", ".html", ".jinja",
                    ".md", ".log", ".wandb"}
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz"}


def test_run_directory_holds_no_pickles(reference):
    run = reference["run"]
    for path in files_under(run):
        rel = path.relative_to(run)
        if path.is_symlink():  # wandb's: latest-run, and its core log kept in ~/.cache/wandb
            target = path.resolve()
            assert target.is_relative_to(run.resolve()) or \
                target.is_relative_to((reference["root"] / "home/.cache/wandb").resolve()), rel
            continue
        assert path.suffix not in PICKLE_SUFFIXES, rel
        assert path.suffix in ALLOWED_SUFFIXES or path.name == ".lock", rel
        head = path.read_bytes()[:4]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), \
            f"{rel} starts like a pickle"
        assert head != b"PK\x03\x04", f"{rel} is a zip (torch.save format)"


def test_pipeline_mcts_critics_never_import_pickle():
    banned = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    offenders = []
    for package in ("pipeline", "mcts", "critics"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
                              for n in names if n.split(".")[0] in banned]
                if isinstance(node, ast.Attribute) and node.attr in ("load", "save") and \
                        isinstance(node.value, ast.Name) and node.value.id in ("torch", "np"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} "
                                     f"{node.value.id}.{node.attr}")
    assert not offenders


def test_trust_remote_code_is_off_unless_set_and_passed_through(tiny_model_dir, monkeypatch):
    import transformers

    from pipeline.compose import compose_config
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.lm.models import load_model
    from pipeline.stages.trl_trainers import load_policy_for_training as _load_model

    assert compose_config([]).model.trust_remote_code is False
    assert compose_config(["model=cuda_bf16"]).model.trust_remote_code is False
    assert compose_config([f"model={tiny_model_dir}"]).model.trust_remote_code is False
    assert compose_config(["model.trust_remote_code=true"]).model.trust_remote_code is True
    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for trust in (False, True):
        seen.clear()
        cfg = ModelConfig(name=str(tiny_model_dir), trust_remote_code=trust)
        load_model(cfg)
        _load_model(str(tiny_model_dir), TrainConfig(), cfg)
        assert seen == [("AutoTokenizer", trust), ("AutoModelForCausalLM", trust),
                        ("AutoModelForCausalLM", trust)]


def test_resume_cannot_switch_trust_remote_code_on(reference, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.loop import resume_run

    run = copy_run(reference, tmp_path / "run", keep=(BASELINE, *STAGES))
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="model.trust_remote_code cannot change on resume"):
        resume_run(str(run), ["model.trust_remote_code=true"])
    assert (run / "manifest.json").read_bytes() == before


def test_a_run_writes_only_inside_its_run_directory_and_cache(reference):
    """HOME, cwd and TMPDIR were fresh directories: everything qstar wrote is in the run
    directory or model.cache_dir; HOME gets only the libraries' own caches (matplotlib's font
    list, wandb's service logs), never anything of qstar's."""
    created = [str(p) for p in reference["created"]]
    library_caches = ("home/.cache/matplotlib/", "home/.cache/wandb/", "home/.config/matplotlib/",
                      "home/.config/wandb/")
    outside = [p for p in created if not p.startswith(("cwd/run/", "cache/", *library_caches))]
    assert not outside, outside
    assert not [p for p in created if "qstar" in p and p.startswith("home/")]
    assert not list((reference["root"] / "tmp").iterdir())
    assert not (reference["root"] / "escape").exists()
    assert sorted(p.name for p in (reference["root"] / "cwd").iterdir()) == ["run"]
    print("files in HOME after a run:", [p for p in created if p.startswith("home/")])
