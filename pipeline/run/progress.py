"""Progress bars on long work (tqdm on stderr). A bar shows only when its caller passes a
description, which callers do only when the config says `progress=true`."""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


def progress_bar(iterable=None, desc: str | None = None, total: int | None = None, **kwargs):
    return tqdm(iterable, desc=desc, total=total, disable=not desc, dynamic_ncols=True,
                leave=False, **kwargs)


@contextmanager
def weight_bars_off():
    """No transformers bars for reading or writing a checkpoint ("Loading weights", "Writing
    model shards": seconds each, a dozen per iteration, in every log) inside the block; qstar
    shows its own bar per stage. A download from the hub keeps its bar (minutes the first time a
    hub model is named). Both switches are restored afterwards."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    transformers_on, hub_off = logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    logging.disable_progress_bar()  # switches the hub's off too
    if not hub_off:
        hub.enable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            logging.enable_progress_bar()  # and the hub's on
        if hub_off:
            hub.disable_progress_bars()
