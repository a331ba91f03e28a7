"""The GRPO module's guarded update and optimizer step (a LightningModule mixin).

`_guarded_update` runs the module's `_update` unless a reward, advantage, weight, old log-prob or
attention map is NaN/inf; `_optimizer_step` clips and steps unless the loss, a gradient or a map
is non-finite, and then drops the gradients instead (flowtracer.train.guards counts the skips;
every process takes the same decision under DDP). With fp16 loss scaling (`trainer.precision:
16-mixed`, CUDA) the gradients are unscaled inside Lightning's optimizer step, so clipping moves
to `on_before_optimizer_step`, and a step whose scaled gradients overflowed is GradScaler's to
skip (it lowers the scale; logged as `amp/overflow_skips`), not a guard skip.
"""

from __future__ import annotations

from flowtracer.batch import RolloutBatch
from flowtracer.train.guards import grads_finite, nonfinite_fields


class GuardedUpdates:
    """Mixin for a LightningModule with `guard` (UpdateGuard), `policy`, `optim`, `rl_step`, `_update`."""

    amp_overflows = 0

    def _guarded_update(self, rollouts: RolloutBatch, plan, pre, timer) -> dict[str, float]:
        """`_update`, unless a reward, advantage, weight, old log-prob or map is NaN/inf: then skip it."""
        bad = nonfinite_fields(rollouts) + (["attention map"] if pre is not None and pre.nonfinite_attention else [])
        self.guard.step_skips = 0
        out = {}
        if self._agree(not bad):  # every process skips together
            out = self._update(rollouts, plan, pre, timer)
        else:
            self.guard.skip(f"non-finite {', '.join(bad) or 'inputs on another process'}", self.rl_step)
        metrics = {**out, **self.guard.metrics()}
        if self._scaler() is not None:
            metrics["amp/overflow_skips"] = float(self.amp_overflows)
        return metrics

    def _agree(self, ok: bool) -> bool:
        return self.trainer.strategy.reduce_boolean_decision(ok, all=True)

    def _scaler(self):
        """The fp16 GradScaler of a 16-mixed run, else None."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _optimizer_step(self, opt, sched) -> None:
        """Clip and step, unless the loss, a gradient or a map is NaN/inf: then drop the gradients."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        finite = grads_finite(params)  # grads already averaged over processes
        if not finite and self._scaler() is not None and not self.guard.reasons:
            self.amp_overflows += 1
            opt.step()  # fp16 overflow: GradScaler skips this step and lowers its scale
            return
        if not self.guard.decide(finite, self._agree, self.rl_step):
            opt.zero_grad(set_to_none=True)
            return
        if self.optim.grad_clip > 0 and self._scaler() is None:
            self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.optim.grad_clip > 0 and self._scaler() is not None:  # unscaled by now (16-mixed)
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
