"""What a long evaluation shows a person: one line per stage and one progress bar over the attacks' images
(tqdm: images per second and ETA), on standard error, only on a terminal and only from the main process.

``DECORR_PROGRESS=1`` forces the bar where standard error is not a terminal (tests, logs read live);
``--quiet`` (``quiet=True``) keeps everything but errors off the screen.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from decorr.distributed import rank
from decorr.evaluation.options import Reporter

__all__ = ["terminal_reporter"]


def terminal_reporter(*, quiet: bool = False) -> Reporter:
    """A :class:`~decorr.evaluation.options.Reporter` printing stage lines and a tqdm bar to stderr."""
    main = rank() == 0
    show_bar = main and not quiet and (sys.stderr.isatty() or os.environ.get("DECORR_PROGRESS") == "1")
    bars: list = []

    def say(message: str) -> None:
        if main and not quiet:
            if bars and bars[-1].n < bars[-1].total:
                bars[-1].write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def progress(total: int, unit_name: str) -> Callable[[int, str], None] | None:
        if not show_bar:
            return None  # the evaluation then says each stage in a line of its own
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", unit_scale=True, desc=unit_name, file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        bars.append(bar)

        def advance(count: int, label: str) -> None:
            if bar.desc != label:
                bar.set_description_str(label, refresh=False)
            bar.update(count)
            if bar.n >= bar.total:
                bar.close()

        return advance

    return Reporter(say=say, progress=progress)


def sweep_reporters(total: int | None, *, quiet: bool = False) -> Callable[[int], Reporter]:
    """One progress bar (gradient evaluations, with ETA) over a whole sweep: the returned function gives the
    :class:`Reporter` of a cell whose attack costs ``per_image`` gradients per image; every cell advances the
    same bar. Stage lines go to stderr only when there is no bar."""
    main = rank() == 0
    show_bar = main and not quiet and bool(total) and (sys.stderr.isatty() or os.environ.get("DECORR_PROGRESS") == "1")
    bar = None
    if show_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="grad", unit_scale=True, desc="sweep", file=sys.stderr, dynamic_ncols=True)

    def reporter(per_image: int) -> Reporter:
        if bar is None:
            return terminal_reporter(quiet=quiet)

        def progress(_total: int, _label: str) -> Callable[[int, str], None]:
            def advance(count: int, label: str) -> None:
                bar.set_description_str(label, refresh=False)
                bar.update(count * per_image)
            return advance

        return Reporter(say=lambda message: None, progress=progress)

    return reporter
