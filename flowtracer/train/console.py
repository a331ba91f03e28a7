"""A quiet first screen for fit / validate / sft: named filters for the warnings and log lines a
flowtracer user cannot act on, a one-line model summary, and a progress bar in RL steps.

Filtered (`QUIET_WARNINGS`, `QUIET_LOGS`; each names where it comes from and why it cannot be acted
on): only those exact messages from those modules, so every other warning, Lightning's actionable
ones included, still shows. Lightning's model summary (a module table whose "Total FLOPs: 0" and
"Modules in train mode" mean nothing for a policy that generates) is off by default
(``trainer.enable_model_summary: true`` brings it back); `StepProgressBar` prints one line of
parameter counts instead.
"""

from __future__ import annotations

import logging
import time
import warnings

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn, RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import ProgressColumn, TextColumn
from rich.text import Text

# name -> (message regex, category, module regex of the warning's origin ("" = any), why a user cannot act on it)
QUIET_WARNINGS: dict[str, tuple[str, type[Warning], str, str]] = {
    "lightningcli-args": (
        r"LightningCLI's args parameter is intended", UserWarning, r"lightning\.pytorch\.cli",
        "flowtracer's own entry point hands LightningCLI the command line as `args` on purpose"),
    "torch-pytree-leafspec": (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree",
        "Lightning's own pytree helper uses a torch API that torch deprecated; fixed in Lightning, not here"),
    "transformers-is-gradient-checkpointing": (
        r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils",
        "peft reads the deprecated transformers property when it wraps the model in LoRA adapters"),
    "manual-optimization-checkpoint": (
        r".*ModelCheckpoint with manual optimization", UserWarning, "",
        "the module saves only after its optimizer steps; the advice about pre-step state does not apply"),
    "dataloader-not-resumable": (
        r".*your dataloader is not resumable", UserWarning, "",
        "the data position is a function of the step (PromptDataModule.train_batch), so a mid-epoch resume is exact"),
}

# name -> (logger, message prefix, why): Lightning's log lines that advertise other products
QUIET_LOGS: dict[str, tuple[str, str, str]] = {
    "lightning-tips": ("lightning.pytorch.utilities.rank_zero", "💡 Tip:",
                       "advertisements for Lightning's cloud services (litlogger, litmodels), not about the run"),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_warnings() -> None:
    """Install the named filters (idempotent: a filter already installed is not added twice)."""
    for message, category, module, _ in QUIET_WARNINGS.values():
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _ in QUIET_LOGS.values():
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in log.filters):
            log.addFilter(_DropPrefixes(prefixes))


def step_text(done: int, total: int | None, start: int, seconds: float) -> tuple[str, str]:
    """("k/max_steps", "s/step and time left") of a run at optimizer step `done` of `total`, after
    `seconds` of stepping since step `start` (the step this process began at: 0, or the resumed
    checkpoint's step, so a resume neither counts the earlier steps as fast nor restarts at 0)."""
    count = f"{done}/{total}" if total else f"{done}"
    ran = done - start
    if ran <= 0 or seconds <= 0:
        return count, "-- s/step"
    per_step = seconds / ran
    timing = f"{per_step:.1f} s/step"
    if total:
        timing += f", {_clock(per_step * max(total - done, 0))} left"
    return count, timing


def _clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class _Field(ProgressColumn):
    """A task field (absent on Lightning's validation tasks: their batch count instead)."""

    def __init__(self, field: str, style: str = ""):
        self.field, self.style = field, style
        super().__init__()

    def render(self, task) -> Text:
        if self.field in task.fields:
            return Text(str(task.fields[self.field]), style=self.style)
        if self.field == "count":
            return Text(f"{int(task.completed)}/{int(task.total)}" if task.total and task.total != float("inf")
                        else f"{int(task.completed)}", style=self.style)
        return Text("")


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counted in optimizer steps: ``train ━━━━ 5/12 9.8 s/step, 1:08 left``.

    The count is ``trainer.global_step`` of ``trainer.max_steps`` (steps of a resumed run count on
    from the checkpoint's), seconds per step are measured over this process's own steps, and
    Lightning's epoch counter and batches-per-second are not shown (a flowtracer run has no
    epochs; its pacing dataloader's batches are not steps). Before the first step, one line of
    parameter counts replaces Lightning's model summary.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, theme: RichProgressBarTheme = RichProgressBarTheme(),
                 console_kwargs: dict | None = None):
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self._start_step, self._start_time = 0, None

    def configure_columns(self, trainer) -> list:
        return [TextColumn("[progress.description]{task.description}"),
                CustomBarColumn(complete_style=self.theme.progress_bar, finished_style=self.theme.progress_bar_finished,
                                pulse_style=self.theme.progress_bar_pulse),
                _Field("count", self.theme.batch_progress), _Field("timing", self.theme.time)]

    def on_fit_start(self, trainer, pl_module) -> None:
        rank_zero_info(_params_line(pl_module))

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step, self._start_time = trainer.global_step, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_disabled or self.progress is None:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        description = "train"
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(total or float("inf"), description)
        self._show(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start_time is None:  # from the first step's start: validation before training is not a step
            self._start_time = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        self._show(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _show(self, trainer) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        seconds = time.monotonic() - self._start_time if self._start_time is not None else 0.0
        count, timing = step_text(trainer.global_step, total, self._start_step, seconds)
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, count=count, timing=timing,
                             visible=True)

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the run folder's version number: not a metric
        return items


def _params_line(module) -> str:
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    share = f" ({100 * trainable / total:.1f}%)" if total else ""
    return f"[flowtracer] model: {_count(total)} parameters, {_count(trainable)} trainable{share}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
