"""Per-stage peak memory: the high-water mark resets at each stage, and the manifest records it."""

import mmap
from types import SimpleNamespace

import pytest

from pipeline.loop import run_stage
from pipeline.report.inspect import iteration_rows
from pipeline.report.summary import policy_rows
from pipeline.run.memory import STATUS, peak_rss_mb, release_freed_memory, reset_peak_rss
from pipeline.run.store import RunStore

MB = 1024 * 1024


def _allocate(mb: int) -> mmap.mmap:
    """Fresh anonymous pages, written so that they are resident. Not a bytes object: malloc may
    serve that from heap memory freed by earlier tests in the same process (an xdist worker),
    which is already resident and moves neither the RSS nor its high-water mark."""
    block = mmap.mmap(-1, mb * MB)
    page = b"\x01" * MB
    for _ in range(mb):
        block.write(page)
    return block


def test_the_peak_counts_an_allocation_and_the_reset_forgets_it():
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the high-water mark")
    before = peak_rss_mb()
    block = _allocate(200)
    assert peak_rss_mb() >= before + 190
    block.close()
    reset_peak_rss()
    assert peak_rss_mb() < before + 100


def _rss_mb() -> float:
    line = next(x for x in STATUS.read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _touched(size: int) -> bytearray:
    chunk = bytearray(size)  # calloc: fresh pages stay unmapped until written
    chunk[::4096] = b"\x01" * len(range(0, size, 4096))
    return chunk


def test_freed_heap_pages_go_back_to_the_kernel_between_stages():
    """Chunks below glibc's mmap threshold come from the heap; freeing nine in ten leaves holes
    that free() keeps resident (it trims only the heap's top). release_freed_memory returns them."""
    if not STATUS.is_file():
        pytest.skip("no /proc/self/status")
    chunks = [_touched(64 * 1024) for _ in range(3200)]  # 200 MiB in heap-sized chunks
    kept = chunks[::10]  # nine in ten freed: holes between live chunks, not a free heap top
    del chunks
    held = _rss_mb()
    if not release_freed_memory():
        pytest.skip("this C library has no malloc_trim")
    assert _rss_mb() < held - 100, (held, _rss_mb())
    assert len(kept) > 300


def test_run_stage_releases_freed_memory_before_the_peak_resets(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("pipeline.loop.release_freed_memory", lambda: calls.append("release"))
    monkeypatch.setattr("pipeline.loop.reset_peak_rss", lambda: calls.append("reset"))
    loop = SimpleNamespace(store=RunStore(tmp_path / "run"), tracker=SimpleNamespace(log=lambda *a: None))
    run_stage(loop, 0, "search", lambda loop, i: calls.append("stage") or {"tokens": 1})
    assert calls == ["release", "reset", "stage"]


def test_run_stage_records_each_stages_own_peak(tmp_path):
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the high-water mark")
    store = RunStore(tmp_path / "run")
    logged = []
    loop = SimpleNamespace(store=store, tracker=SimpleNamespace(log=lambda *a: logged.append(a)))
    baseline = {"decodes": {"greedy": {"accuracy": 0.5}}}

    def big_stage(loop, i):
        block = _allocate(300)
        size = len(block)
        block.close()
        return {**baseline, "size": size}

    run_stage(loop, 0, "baseline", big_stage)
    run_stage(loop, 0, "search", lambda loop, i: {"tokens": 1})
    stages = store.manifest["stages"]
    big, small = stages["iter_000/baseline"]["peak_rss_mb"], stages["iter_000/search"]["peak_rss_mb"]
    assert big >= small + 250, (big, small)
    assert policy_rows(store)[0]["peak_rss_mb"] == big
    header, row = iteration_rows(store)
    assert header[-1] == "peak_gb" and row[-1] == format(big / 1024, ".1f")


def test_runs_recorded_before_the_peak_existed_show_a_dash(tmp_path):
    store = RunStore(tmp_path / "run")
    store.complete(0, "baseline", {"decodes": {"greedy": {"accuracy": 0.5}}}, 1.0)
    del store.manifest["stages"]["iter_000/baseline"]["peak_rss_mb"]  # as an old manifest
    assert policy_rows(store)[0]["peak_rss_mb"] is None
    assert iteration_rows(store)[1][-1] == "-"
