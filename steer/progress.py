"""One progress convention for every long run: a `Progress` callback.

A function that runs long takes `progress: Progress | None = None` and calls
`progress(done, total, note)` as work gets done: `done` of `total` units (prompts, batches, layers,
steps; the unit is the function's), `note` a short status ("layer 3/30", "k=2: ppl ratio 1.03").
`total == 0` means a status note with nothing to count ("loading the dense model").

- The library is silent by default (None; False is accepted as None, for `progress=not quiet`-style
  code).
- The CLI passes `bar(desc)`: a tqdm bar on stderr (notes without a count are printed as lines).
- A notebook or the Streamlit app passes any callable `(done, total, note)`.
"""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    """Called with (done, total, note) as a run makes progress; its return value is ignored."""

    def __call__(self, done: int, total: int, note: str) -> object: ...


def silent(done: int, total: int, note: str) -> None:
    """The library default: report nothing."""


def as_progress(progress: Progress | None | bool) -> Progress:
    """The callable to report to: `silent` for None/False; a clear error for True (which bar?)."""
    if progress is None or progress is False:
        return silent
    if progress is True or not callable(progress):
        raise TypeError(
            f"progress must be a callable (done, total, note) or None (got {progress!r}); for a bar on "
            f"stderr pass steer.progress.bar('description')"
        )
    return progress


class Bar:
    """A tqdm bar on stderr as a `Progress`: started at the first count, restarted when the total
    changes (a new phase), closed when done reaches total or by `close()`."""

    def __init__(self, desc: str, unit: str = "it"):
        self.desc, self.unit = desc, unit
        self._bar = None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        from tqdm.auto import tqdm

        if total <= 0:  # a status note, nothing to count
            if note:
                tqdm.write(f"{self.desc}: {note}", file=sys.stderr)
            return
        if self._bar is None or self._bar.total != total or done < self._bar.n:
            self.close()
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def bar(desc: str, unit: str = "it", *, enabled: bool = True) -> Progress | None:
    """A tqdm bar on stderr (what the CLI shows), or None when not `enabled` (--quiet, --json)."""
    return Bar(desc, unit) if enabled else None


class Steps:
    """A running count reported to a `Progress`: starts at 0 of `total`, `advance(n, note)` adds n."""

    def __init__(self, progress: Progress | None, total: int, note: str = ""):
        self.report, self.done, self.total = as_progress(progress), 0, total
        self.report(0, total, note)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.report(self.done, self.total, note)
