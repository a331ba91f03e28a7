"""Advantages and the token-weighted policy loss: pure torch functions, no Lightning."""

from flowtracer.rl.advantages import ADVANTAGE_MODES, check_finite, group_advantages
from flowtracer.rl.loss import AGGREGATIONS, IS_LEVELS, policy_loss, truncated_is

__all__ = ["ADVANTAGE_MODES", "AGGREGATIONS", "IS_LEVELS", "check_finite", "group_advantages", "policy_loss",
           "truncated_is"]
