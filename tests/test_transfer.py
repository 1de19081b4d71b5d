"""Run files through Ray's object store (pipeline/run/transfer.py): the packed layout comes back
as it was, and a worker's unpacked copies and stage directories leave nothing in its /tmp."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.compose import compose_config
from pipeline.run import transfer
from pipeline.run.store import RunStore
from pipeline.run.transfer import RunFiles, pack, unpack, unpack_atomic, worker_dir
from pipeline.run.workers import Cluster
from pipeline.stages.base import Loop, stage_work


def _run(root: Path) -> Path:
    (root / "iter_000" / "train" / "policy").mkdir(parents=True)
    (root / "iter_000" / "train" / "policy" / "meta.json").write_text('{"x": 1}')
    (root / "iter_000" / "train" / "policy" / ".tmp-partial").write_text("half")
    (root / "manifest.json").write_text("{}")
    return root


def test_pack_unpack_keeps_the_layout_and_skips_temporaries(tmp_path):
    files = pack(_run(tmp_path / "run"), ["iter_000/train/policy", "manifest.json"])
    assert set(files) == {"iter_000/train/policy/meta.json", "manifest.json"}
    back = unpack(files, tmp_path / "copy")
    assert (back / "iter_000/train/policy/meta.json").read_text() == '{"x": 1}'
    with pytest.raises(ValueError, match="outside"):
        unpack({"../escape": b""}, tmp_path / "copy")
    unpack_atomic(files, tmp_path / "atomic")
    assert sorted(p.name for p in (tmp_path / "atomic").iterdir()) == ["iter_000", "manifest.json"]


def test_worker_directories_are_removed_when_the_work_ends(tmp_path, monkeypatch):
    with worker_dir("stage") as made:
        (made / "f").write_text("x")
    assert not made.exists()
    packed = pack(_run(tmp_path / "run"), ["iter_000/train/policy"])
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(get=lambda ref: ref))  # a fake store
    seen = {}

    def work(root: Path, target: Path) -> str:
        seen["root"], seen["target"] = root, target
        (target / "out.txt").write_text((root / "iter_000/train/policy/meta.json").read_text())
        return "done"

    result, back = stage_work(work, RunFiles(refs={k: [v] for k, v in packed.items()}), None)  # as under cluster=ray
    assert result == "done" and back == {"out.txt": b'{"x": 1}'}
    assert not seen["root"].exists() and not seen["target"].exists()
    local = tmp_path / "stage"
    local.mkdir()
    result, back = stage_work(work, RunFiles(root=str(tmp_path / "run")), str(local))  # in-process
    assert back is None and seen["root"] == tmp_path / "run" and (local / "out.txt").is_file()
    assert (tmp_path / "run" / "manifest.json").is_file()  # the run itself is never removed


def test_pack_leaves_out_what_lies_under_a_skipped_directory(tmp_path):
    run = _run(tmp_path / "run")
    policy = run / "iter_000/train/policy"
    for rel in ("dpo_phase/model.safetensors", "dpo_phase/sub/tokenizer.json", "dpo_phase_notes.txt"):
        (policy / rel).parent.mkdir(parents=True, exist_ok=True)
        (policy / rel).write_text(rel)
    rels = ["iter_000/train/policy"]
    everything = pack(run, rels)
    assert {"iter_000/train/policy/dpo_phase/model.safetensors",
            "iter_000/train/policy/dpo_phase/sub/tokenizer.json"} < set(everything)
    packed = pack(run, rels, skip=["iter_000/train/policy/dpo_phase"])
    # the directory and all below it, not a sibling whose name merely starts alike
    assert set(packed) == {"iter_000/train/policy/meta.json",
                           "iter_000/train/policy/dpo_phase_notes.txt"}
    assert pack(run, rels, skip=["iter_000/train"]) == {}


def test_run_files_skip_every_dpo_phase_but_the_implicit_policys_however_it_is_named(tmp_path):
    run = _run(tmp_path / "run")
    (run / "iter_000/data").mkdir()
    (run / "manifest.json").unlink()  # a run just started
    shares = []
    loop = SimpleNamespace(store=RunStore(run), cluster=SimpleNamespace(
        share=lambda root, rels, skip: shares.append((rels, skip))))
    rels = ["iter_000/train/policy", "iter_000/data", None, "HuggingFaceTB/SmolLM2-135M-Instruct"]
    Loop.run_files(loop, rels)
    Loop.run_files(loop, [*rels, "./iter_000/train/policy/"], implicit="iter_000/train/policy")
    kept = ["dpo_phase", "sft_phase"]
    assert shares == [
        (["iter_000/train/policy", "iter_000/data"],  # model names and None are not run files
         [f"{rel}/{k}" for rel in ("iter_000/train/policy", "iter_000/data") for k in kept]),
        (["iter_000/train/policy", "iter_000/data", "./iter_000/train/policy/"],
         [f"iter_000/data/{k}" for k in kept])]  # the policy's own, named either way, are kept


class _FakeStore:
    """Ray's put/get, in memory: put returns a fresh token, get the bytes put under it."""

    def __init__(self):
        self.objects = {}

    def put(self, data: bytes):
        token = object()
        self.objects[token] = data
        return token

    def get(self, token):
        return self.objects[token]


def _shipping_cluster(monkeypatch) -> tuple[Cluster, _FakeStore]:
    store = _FakeStore()
    cluster = Cluster(compose_config([]))  # cluster=local, then given a (fake) object store
    cluster.ray = store
    monkeypatch.setitem(sys.modules, "ray", store)  # what RunFiles.opened imports in a worker
    return cluster, store


def test_share_puts_each_file_once_while_the_next_stage_reuses_it(tmp_path, monkeypatch):
    """Under Ray each file goes into the object store on its own; the previous call's files,
    unchanged, are not put again; a rewritten file is; only the last two calls are remembered.
    A worker's directory holds the run's layout either way."""
    run = _run(tmp_path / "run")
    (run / "iter_000/data").mkdir()
    (run / "iter_000/data/dpo.jsonl").write_text("{}\n")
    cluster, store = _shipping_cluster(monkeypatch)
    policy, data = ["iter_000/train/policy"], ["iter_000/data"]

    first = cluster.share(run, policy)
    assert set(first.refs) == {"iter_000/train/policy/meta.json"} and cluster.puts == 1
    second = cluster.share(run, [*policy, *data])  # train: the same policy and its data
    assert cluster.puts == 2 and second.refs["iter_000/train/policy/meta.json"] is \
        first.refs["iter_000/train/policy/meta.json"]
    with second.opened("stage") as root:
        assert (root / "iter_000/train/policy/meta.json").read_text() == '{"x": 1}'
        assert (root / "iter_000/data/dpo.jsonl").read_text() == "{}\n"
        assert root != run
    assert not root.exists()

    (run / "iter_000/data/dpo.jsonl").write_text('{"rewritten": 1}\n')  # a new file: put again
    third = cluster.share(run, data)
    assert cluster.puts == 3
    with third.opened() as root:
        assert (root / "iter_000/data/dpo.jsonl").read_text() == '{"rewritten": 1}\n'
    cluster.share(run, data)
    cluster.share(run, policy)  # two calls since the policy was shipped last: put again
    assert cluster.puts == 4 and len(store.objects) == 4


def test_a_large_file_travels_in_pieces_and_arrives_whole(tmp_path, monkeypatch):
    """The driver reads and puts a file CHUNK_BYTES at a time (a 15 GB checkpoint never sits in
    its memory whole); the worker writes the pieces back in order. An empty file arrives too."""
    run = _run(tmp_path / "run")
    weights = run / "iter_000/train/policy/model.safetensors"
    weights.write_bytes(bytes(range(256)) * 40 + b"tail")  # 10,244 bytes
    (run / "iter_000/train/policy/empty.txt").write_bytes(b"")
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1000)
    cluster, store = _shipping_cluster(monkeypatch)
    shipped = cluster.share(run, ["iter_000/train/policy"])
    pieces = shipped.refs["iter_000/train/policy/model.safetensors"]
    assert [len(store.get(p)) for p in pieces] == [1000] * 10 + [244]
    assert len(shipped.refs["iter_000/train/policy/empty.txt"]) == 1
    with shipped.opened() as root:
        assert (root / "iter_000/train/policy/model.safetensors").read_bytes() == weights.read_bytes()
        assert (root / "iter_000/train/policy/empty.txt").read_bytes() == b""
        assert (root / "iter_000/train/policy/meta.json").read_text() == '{"x": 1}'
