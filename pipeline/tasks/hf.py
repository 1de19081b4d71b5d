"""task=hf: a Hugging Face dataset in GSM8K format, via `datasets.load_dataset`."""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.errors import QstarError
from pipeline.tasks.base import _one_line
from pipeline.tasks.math_rows import MathTask


class HFTask(MathTask):
    """`datasets.load_dataset(task.name, task.hf_config)`, GSM8K-format rows."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        import datasets  # slow to import, and only this task needs it

        self.name = cfg.name
        try:
            data = datasets.load_dataset(cfg.name, cfg.hf_config)
        except Exception as e:  # no hub, unknown name, bad config: one line, no traceback
            raise QstarError(f"task.name={cfg.name!r} (task.hf_config={cfg.hf_config!r}): cannot "
                             f"load Hugging Face dataset: {_one_line(e)}") from None
        pools = []
        for key, split in (("task.hf_train_split", cfg.hf_train_split),
                           ("task.hf_test_split", cfg.hf_test_split)):
            if split not in data:
                raise QstarError(f"{key}={split!r}: dataset {cfg.name} has no such split "
                                 f"(has: {', '.join(data)})")
            rows = ((f"{cfg.name}/{split}/{i}", f"{cfg.name}[{split}] row {i}", row)
                    for i, row in enumerate(data[split]))
            pools.append(self._read(rows))
        self._warn_skipped(cfg.name)
        self._split_two(pools[0], pools[1], f"{cfg.name}[{cfg.hf_train_split}]",
                        f"{cfg.name}[{cfg.hf_test_split}]")
