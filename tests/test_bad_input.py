"""A catalogue of bad input to `qstar run` and `qstar resume`, each through the real CLI.

Each one must give exactly one stderr line starting with `error:` (the last line), exit code 2,
no traceback, and leave nothing half-written: a refused `qstar run` creates no run directory;
a refused `qstar resume` changes no file of the run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import QstarError
from pipeline.run import atomic

QSTAR = str(Path(sys.executable).parent / "qstar")


def gsm_rows(n: int) -> list[str]:
    return [json.dumps({"question": f"What is {i} plus one?", "answer": f"{i} + 1\n#### {i + 1}"})
            for i in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main() in-process; `qstar run` exits from inside Hydra, so SystemExit counts too."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def the_error_line(rc, out: str, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    # nothing else from qstar (its progress lines start with `qstar:`, warnings with `warning:`)
    assert not [line for line in lines[:-1] if line.startswith(("qstar", "warning:"))], err
    return errors[0]


def snapshot(root: Path) -> dict:
    """Every file under root (but the lock, whose content is the last holder's pid): its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def a_run(tmp_path, debug_overrides) -> Path:
    """A run directory as `qstar run` leaves it before its first stage (a valid manifest)."""
    from pipeline.compose import compose_config
    from pipeline.config import to_dict
    from pipeline.run.store import RunStore

    run = tmp_path / "run"
    store = RunStore(run)
    store.set_info(iterations=1, config=to_dict(compose_config(debug_overrides)))
    return run


# ---------------------------------------------------------------- qstar run: data, task, model


def malformed(d: Path) -> tuple[Path, str]:
    path = write_lines(d / "bad.jsonl", gsm_rows(2) + ['{"question": "3 + 4?", "answer": '])
    return path, f"{path}:3: bad JSON"


def not_an_object(d: Path) -> tuple[Path, str]:
    path = write_lines(d / "list.jsonl", gsm_rows(1) + ["[1, 2]"])
    return path, f"{path}:2: not a JSON object"


def missing_answer(d: Path) -> tuple[Path, str]:
    path = write_lines(d / "noanswer.jsonl", gsm_rows(1) + [json.dumps({"question": "2 + 2?"})])
    return path, f"{path}:2: missing text field 'answer' (task.answer_field)"


def answer_without_hashes(d: Path) -> tuple[Path, str]:
    path = write_lines(d / "nohash.jsonl", [json.dumps({"question": "2+2?", "answer": "4"})])
    return path, f"{path}:1: field 'answer' has no final '#### <answer>'"


def unparseable_gold(d: Path) -> tuple[Path, str]:
    row = json.dumps({"question": "How many?", "answer": "Count them.\n#### twelve"})
    path = write_lines(d / "words.jsonl", gsm_rows(2) + [row])
    return path, f"{path}:3: gold answer 'twelve' in field 'answer' cannot be parsed by math-verify"


def empty(d: Path) -> tuple[Path, str]:
    path = d / "empty.jsonl"
    path.write_text("")
    return path, f"{path} has no usable rows"


def blank_lines_only(d: Path) -> tuple[Path, str]:
    path = d / "blank.jsonl"
    path.write_text("\n\n  \n")
    return path, f"{path} has no usable rows"


def too_few(d: Path) -> tuple[Path, str]:
    path = write_lines(d / "small.jsonl", gsm_rows(3))  # debug: 4 train + 4 held out
    return path, "requested but"


def missing_file(d: Path) -> tuple[Path, str]:
    return d / "nope.jsonl", f"task.path={d / 'nope.jsonl'}: no such file or directory"


def dir_without_test(d: Path) -> tuple[Path, str]:
    write_lines(d / "train.jsonl", gsm_rows(8))
    return d, "directory has no test.jsonl"


@pytest.mark.parametrize("make", [malformed, not_an_object, missing_answer, answer_without_hashes,
                                  unparseable_gold, empty, blank_lines_only, too_few, missing_file,
                                  dir_without_test])
def test_bad_data_file(make, data_dir, debug_overrides, tmp_path, capsys):
    path, needle = make(data_dir)
    run = tmp_path / "run"
    rc, out, err = cli(["run", *debug_overrides, "task=jsonl", f"task.path={path}",
                        f"hydra.run.dir={run}"], capsys)
    line = the_error_line(rc, out, err)
    assert needle in line, line
    assert not run.exists()  # refused before Hydra made a run directory


UNKNOWN_INPUT = [
    (["task.kind=foo"], "Invalid value 'foo', expected one of [arithmetic, chain_steps, reasoning_gym, jsonl, hf, custom]"),
    (["task=foo"], "Could not find 'task/foo'"),
    (["task=reasoning_gym", "task.name=no_such_generator"],
     "task.name='no_such_generator' is not a reasoning-gym generator; valid names: "),
    (["model=/no/such/checkpoint"], "model.name='/no/such/checkpoint': no such directory"),
    (["model=nobody-qstar/no-such-model"], "model.name='nobody-qstar/no-such-model': not a local "
                                          "directory, not in the Hugging Face cache"),
    (["model=.no-such-dir"], "model.name='.no-such-dir': no such directory"),
]


def test_model_directory_without_config(debug_overrides, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    rc, out, err = cli(["run", *debug_overrides, f"model={tmp_path / 'empty-model'}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert "directory has no config.json" in the_error_line(rc, out, err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- qstar run: config values


INVALID_VALUES = [
    (["search.simulations=-1"], "config key search.simulations=-1 is invalid: must be >= 1"),
    (["search.simulations=0"], "config key search.simulations=0 is invalid: must be >= 1"),
    (["search.rollout.temperature=-0.5"],
     "config key search.rollout.temperature=-0.5 is invalid: must be >= 0 (0 = greedy)"),
    (["search.c_min=4", "search.c_max=3"], "config key search.c_min=4 is invalid: need 1 <= c_min <= c_max"),
    (["search.root_c_min=6", "search.root_c_max=5"], "search.root_c_min=6 is invalid"),
    (["search.dead_end_retries=-1"],
     "config key search.dead_end_retries=-1 is invalid: must be >= 0"),
    (["search.prune_steps=true", "task=arithmetic"],
     "config key search.prune_steps=True is invalid: needs a verifier that reads the working"),
    (["search.prune_steps=true", "task.verify_steps=false"], "search.prune_steps=True is invalid"),
    (["task.num_train=8", "search.problems_per_iteration=9"],
     "config key search.problems_per_iteration=9 is invalid: need 0 <= problems_per_iteration "
     "<= task.num_train=8 (0 = all)"),
    (["search.problems_per_iteration=-1"], "search.problems_per_iteration=-1 is invalid"),
    (["train.pairs.sft_per_problem=-2"],
     "config key train.pairs.sft_per_problem=-2 is invalid: must be >= 0 (or -1: no cap)"),
    (["train.pairs.max_per_problem=-5"], "config key train.pairs.max_per_problem=-5 is invalid"),
    (["train.sft_learning_rate=0"],
     "config key train.sft_learning_rate=0.0 is invalid: must be > 0 (or null: train.learning_rate)"),
    (["train.history=0"],
     "config key train.history=0 is invalid: must be >= 1 (or -1: every iteration so far)"),
    (["train.from_base=true"],
     "config key train.from_base=True is invalid: true needs train.reference=base or sft when DPO "
     "trains (DPO starts from the model it is anchored to)"),
    (["train=grpo", "train.history=-1"],
     "config key train.history=-1 is invalid: train.mode=grpo trains on its own samples, from "
     "policy_i: must be 1"),
    (["train=grpo", "train.from_base=true"],
     "config key train.from_base=True is invalid: train.mode=grpo trains on its own samples, "
     "from policy_i: must be false"),
    (["train.beta=0"], "config key train.beta=0.0 is invalid: must be > 0"),
    (["train.beta=-0.1"], "config key train.beta=-0.1 is invalid: must be > 0"),
    (["train.reference_batch_size=0"], "config key train.reference_batch_size=0 is invalid: must be >= 1"),
    (["train.lora_layer_fraction=0"], "config key train.lora_layer_fraction=0.0 is invalid: must be in (0, 1] (1: every decoder layer)"),
    (["train=dpo_then_sft", "train.reference=sft"],
     "config key train.reference='sft' is invalid: sft needs train.mode=dpo (it adds the SFT phase "
     "before DPO), not dpo_then_sft"),
    (["task.seed=-1"], "config key task.seed=-1 is invalid: must be >= 0"),
    (["iterations=0"], "config key iterations=0 is invalid: must be >= 1"),
    (["iterations=-3"], "config key iterations=-3 is invalid: must be >= 1"),
    (["critics.weights.value=0", "critics.weights.prm=0", "critics.weights.orm=0",
      "critics.weights.rollout=0"], "critics.weights=[0.0, 0.0, 0.0, 0.0, 0.0] is invalid: weights "
                                    "must be >= 0 and sum to more than 0"),
    (["critics.trained_weights.value=0", "critics.trained_weights.prm=0",
      "critics.trained_weights.orm=0", "critics.trained_weights.rollout=0"],
     "critics.trained_weights=[0.0, 0.0, 0.0, 0.0, 0.0] is invalid"),
    (["critics.weights.value=-1"], "critics.weights=[-1.0, 0.0, 0.2, 0.8, 0.0] is invalid"),
    (["critics.trained_weights.implicit=-1"], "critics.trained_weights=[0.3, 0.2, 0.2, 0.3, -1.0]"),
    (["critics.trained_weights.verifier=1"], "Key 'verifier' not in 'CriticWeights'"),
    (["train.reference=last"], "Invalid value 'last', expected one of [previous, base, sft]"),
    (["decode.select=likelihood"], "expected one of [majority, orm, orm_vote, implicit, implicit_vote, checked_majority]"),
    (["decode.n=0"], "config key decode.n=0 is invalid: must be >= 1"),
    (["decode.beam_width=0"], "config key decode.beam_width=0 is invalid: must be >= 1"),
    (["search.algorithm=greedy"], "Invalid value 'greedy', expected one of [mcts, sample]"),
    (["search.best_path=longest"], "Invalid value 'longest', expected one of [visits, q, vote, majority, draws]"),
    (["critics.orm_features=entropy"], "Invalid value 'entropy', expected one of [confidence, hidden]"),
    (["critics.state_features=entropy"], "Invalid value 'entropy', expected one of [confidence, hidden]"),
    (["search.simulations=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    (["search.no_such_key=1"], "Key 'no_such_key' not in 'SearchConfig'"),
    (["eval.decodes=[greedy,telepathy]"], "eval.decodes='telepathy' is invalid"),
    (["task=jsonl"], "task.path"),
]


@pytest.mark.parametrize("overrides,needle", UNKNOWN_INPUT + INVALID_VALUES)
def test_bad_run_input_is_one_line_and_makes_no_run(overrides, needle, debug_overrides, tmp_path,
                                                    capsys):
    run = tmp_path / "run"
    rc, out, err = cli(["run", *debug_overrides, *overrides, f"hydra.run.dir={run}"], capsys)
    line = the_error_line(rc, out, err)
    assert needle in line, line
    assert not run.exists()


# ---------------------------------------------------------------- qstar resume


def test_resume_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    before = snapshot(tmp_path)
    rc, out, err = cli(["resume", str(tmp_path)], capsys)
    line = the_error_line(rc, out, err)
    assert line == f"error: {tmp_path} is not a qstar run directory (no manifest.json)"
    assert snapshot(tmp_path) == before and not (tmp_path / ".lock").exists()


def test_resume_a_missing_directory(tmp_path, capsys):
    rc, out, err = cli(["resume", str(tmp_path / "gone")], capsys)
    assert "is not a qstar run directory" in the_error_line(rc, out, err)
    assert not (tmp_path / "gone").exists()


def test_resume_without_a_directory(capsys):
    rc, out, err = cli(["resume"], capsys)
    assert "qstar resume needs a run directory" in the_error_line(rc, out, err)


def test_resume_a_manifest_from_another_version(a_run, capsys):
    manifest = json.loads((a_run / "manifest.json").read_text())
    manifest["version"] = 999
    (a_run / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(a_run)
    rc, out, err = cli(["resume", str(a_run)], capsys)
    line = the_error_line(rc, out, err)
    assert "manifest version 999 is not 1; this qstar cannot resume that run" in line
    assert snapshot(a_run) == before


def test_resume_an_unreadable_manifest(a_run, capsys):
    text = (a_run / "manifest.json").read_text()
    (a_run / "manifest.json").write_text(text[: len(text) // 2])  # e.g. copied while written
    before = snapshot(a_run)
    rc, out, err = cli(["resume", str(a_run)], capsys)
    assert "manifest.json: unreadable manifest" in the_error_line(rc, out, err)
    assert snapshot(a_run) == before


def test_resume_a_manifest_without_config(a_run, capsys):
    (a_run / "manifest.json").write_text(json.dumps({"version": 1, "stages": {}}))
    before = snapshot(a_run)
    rc, out, err = cli(["resume", str(a_run)], capsys)
    assert "records no config; cannot resume it" in the_error_line(rc, out, err)
    assert snapshot(a_run) == before


@pytest.mark.parametrize("override,needle", [
    ("search.simulations=4", "search.simulations cannot change on resume"),
    ("model.trust_remote_code=true", "model.trust_remote_code cannot change on resume"),
    ("iterations", "expected KEY=VALUE"),
    ("iterations=0", "config key iterations=0 is invalid"),
    ("iterations=lots", "could not be converted to Integer"),
])
def test_resume_with_a_refused_override(a_run, override, needle, capsys):
    before = snapshot(a_run)
    rc, out, err = cli(["resume", str(a_run), override], capsys)
    assert needle in the_error_line(rc, out, err)
    assert snapshot(a_run) == before


def test_unknown_command(capsys):
    rc, out, err = cli(["frobnicate"], capsys)
    assert "unknown command 'frobnicate'" in the_error_line(rc, out, err)


# ---------------------------------------------------------------- disk full


class FullDisk:
    """`open` for pipeline.run.atomic whose files take `room` bytes, then fail with ENOSPC."""

    def __init__(self, room: int = 64):
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode:
            return f
        room, real_write = self.room, f.write

        def write(data):
            nonlocal room
            if len(data) > room:
                real_write(data[:room])  # a partial write, then the device is full
                room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room -= len(data)
            return real_write(data)

        f.write = write
        return f


def test_disk_full_while_resume_writes_the_manifest(a_run, monkeypatch, capsys):
    before = snapshot(a_run)
    monkeypatch.setattr(atomic, "open", FullDisk(), raising=False)
    rc, out, err = cli(["resume", str(a_run), "iterations=2"], capsys)
    line = the_error_line(rc, out, err)
    assert line == f"error: cannot write {a_run / 'manifest.json'}: No space left on device"
    assert snapshot(a_run) == before  # the previous manifest is untouched
    assert not list(a_run.rglob(".tmp-*"))


@pytest.mark.parametrize("writer", ["write_jsonl", "write_json", "atomic_dir"])
def test_disk_full_keeps_the_previous_version_and_no_temp(writer, tmp_path, monkeypatch):
    target = tmp_path / ("artifact" if writer == "atomic_dir" else "artifact.jsonl")
    if writer == "atomic_dir":
        target.mkdir()
        (target / "weights.json").write_text('{"old": true}')
    else:
        target.write_text('{"old": true}\n')
    before = snapshot(tmp_path)
    monkeypatch.setattr(atomic, "open", FullDisk(room=10), raising=False)
    # atomic_dir names the file inside its temporary directory that could not be written
    with pytest.raises(QstarError, match=rf"cannot write {tmp_path}/\S*artifact\S*: No space left on device"):
        if writer == "write_jsonl":
            atomic.write_jsonl(target, [{"new": "x" * 100}, {"new": 2}])
        elif writer == "write_json":
            atomic.write_json(target, {"new": "x" * 100})
        else:
            with atomic.atomic_dir(target) as tmp:
                atomic.write_json(tmp / "weights.json", {"new": "x" * 100})
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.rglob(".tmp-*"))


# ---------------------------------------------------------------- through the installed script


def run_qstar(args: list[str], cwd: Path, preexec=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run([QSTAR, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


def test_script_malformed_jsonl(data_dir, debug_overrides, tmp_path):
    path, needle = malformed(data_dir)
    proc = run_qstar(["run", *debug_overrides, "task=jsonl", f"task.path={path}",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert needle in the_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_script_c_min_above_c_max(debug_overrides, tmp_path):
    proc = run_qstar(["run", *debug_overrides, "search.c_min=4", "search.c_max=3"], tmp_path)
    assert "search.c_min=4 is invalid" in the_error_line(proc.returncode, proc.stdout,
                                                         proc.stderr)
    assert not (tmp_path / "runs").exists()


def test_script_resume_not_a_run(tmp_path):
    proc = run_qstar(["resume", str(tmp_path)], tmp_path)
    assert "is not a qstar run directory" in the_error_line(proc.returncode, proc.stdout,
                                                            proc.stderr)


def test_script_resume_manifest_from_another_version(a_run, tmp_path):
    (a_run / "manifest.json").write_text(json.dumps({"version": 0, "stages": {}}))
    proc = run_qstar(["resume", str(a_run)], tmp_path)
    assert "manifest version 0 is not 1" in the_error_line(proc.returncode, proc.stdout,
                                                           proc.stderr)


def test_script_disk_full(a_run, tmp_path):
    """A real failing write: the file size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ) lets the
    lock file's pid through but not the new manifest, like a disk with a few bytes left."""
    before = snapshot(a_run)
    limit = 256
    assert (a_run / "manifest.json").stat().st_size > limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run_qstar(["resume", str(a_run), "iterations=2"], tmp_path, preexec=small_files)
    line = the_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert line == f"error: cannot write {a_run / 'manifest.json'}: File too large"
    assert snapshot(a_run) == before
    assert not list(a_run.rglob(".tmp-*"))


def test_script_disk_full_while_saving_weights(tmp_path):
    """safetensors reports a failed write as SafetensorError, not OSError: atomic_dir still makes
    it one QstarError naming the directory, and the previous weights stay."""
    target = tmp_path / "critics"
    target.mkdir()
    (target / "head.safetensors").write_bytes(b"old weights")
    code = (
        "import resource, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from pipeline.run.atomic import atomic_dir\n"
        "from pipeline.errors import QstarError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    with atomic_dir({str(target)!r}) as tmp:\n"
        "        save_file({'w': torch.zeros(100_000)}, str(tmp / 'head.safetensors'))\n"
        "except QstarError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith(f"cannot write {target}: ") and "File too large" in proc.stdout
    assert (target / "head.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["critics"]
