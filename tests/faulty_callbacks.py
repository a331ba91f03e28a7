"""A credit arm with a bug (`trainer.callbacks: - class_path: faulty_callbacks.MissingKeyCredit`), for the
test that a code bug shows its traceback instead of a one-line "error"."""

from flowtracer.credit.base import RolloutCallback


class MissingKeyCredit(RolloutCallback):
    """Reads a metric no stage writes: a KeyError, as a user callback's bug would raise."""

    def on_rollout_batch(self, trainer, pl_module, rollouts) -> None:
        rollouts.token_weights = rollouts.response_mask.float() * rollouts.metrics["missing_key"]
