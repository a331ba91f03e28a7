"""Wall-clock seconds per named phase of a step (generate, score, old_pass, credit, forward, ...).

On CUDA the device runs asynchronously: a host clock read right after launching a phase's kernels
would book their run time to whichever later phase synchronises first. The timer synchronises the
device at every phase boundary on CUDA (a few syncs per step; a step synchronises anyway when it
reads rewards and losses), so `time/credit` and the grid's credit-overhead column are true.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = {}
        self._sync()
        self._start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-attribute `seconds` already counted in phase `src` to phase `dst`."""
        self.seconds[src] = self.seconds.get(src, 0.0) - seconds
        self.seconds[dst] = self.seconds.get(dst, 0.0) + seconds

    def metrics(self, generated_tokens: int) -> dict[str, float]:
        self._sync()
        total = time.perf_counter() - self._start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = total
        out["time/credit_share"] = self.seconds.get("credit", 0.0) / max(total, 1e-9)
        out["throughput/gen_tokens_per_s"] = generated_tokens / max(self.seconds.get("generate", 0.0), 1e-9)
        return out
