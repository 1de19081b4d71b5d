"""The loop's stages: search, critics, data, train, eval; each module has `run(loop, i) -> dict`."""

