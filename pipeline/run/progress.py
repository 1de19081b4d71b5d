"""Progress bars on long work (tqdm on stderr). A bar shows only when its caller passes a
description, which callers do only when the config says `progress=true`."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, desc: str | None = None, total: int | None = None, **kwargs):
    return tqdm(iterable, desc=desc, total=total, disable=not desc, dynamic_ncols=True,
                leave=False, **kwargs)
