"""Progress reporting and cancellation, host-agnostic.

A host passes ``progress(done, total, info)``; the callback may raise (ComfyUI's interrupt, the WebUI's
stop button, ``Interrupted``) to cancel. Every long loop in the core calls it, and every long operation
works on a copy or runs inside ``transaction.py``'s transaction, so a cancelled run leaves the input untouched.
"""
from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, int, dict], None]


class Stage:
    def __init__(self, progress: Optional[ProgressFn], total: int, desc: str = ""):
        self.progress, self.total, self.desc, self.done = progress, max(int(total), 1), desc, 0
        self._bar = None
        if progress is None:
            return
        if progress == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, leave=False, dynamic_ncols=True)

    def step(self, n: int = 1, **info):
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()})
        elif self.progress is not None:
            self.progress(self.done, self.total, dict(info, stage=self.desc))

    def close(self):
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
