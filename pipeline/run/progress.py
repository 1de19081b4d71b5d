"""Progress bars on long work (tqdm on stderr); off when QSTAR_PROGRESS=0 or no description."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def enabled() -> bool:
    return os.environ.get("QSTAR_PROGRESS", "1") != "0"


def progress_bar(iterable=None, desc: str | None = None, total: int | None = None, **kwargs):
    return tqdm(iterable, desc=desc, total=total, disable=not (desc and enabled()),
                dynamic_ncols=True, leave=False, **kwargs)
