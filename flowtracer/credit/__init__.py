"""Credit arms: per-token weights for a scored rollout batch (one file per arm).

    trainer.callbacks:
      - class_path: flowtracer.credit.FlowCredit
        init_args: {top_frac: 0.4, gamma: 1.5}

The arms are plain torch and need no Lightning (with Lightning installed they are also Lightning
callbacks, which is how the YAML above uses them). Any other trainer calls
`flowtracer.credit.weights.token_weights(arm, model, ...)`: the capture pass the arm needs, then the
arm, on plain tensors; `flowtracer.credit.masks` builds the question and answer masks it reads.
`select` (token selection) and `stats` (token classes) are the shared pure parts.
"""

from flowtracer.credit.attention import AttentionCredit
from flowtracer.credit.base import RolloutCallback, ScoreCredit, UniformCredit
from flowtracer.credit.entropy import EntropyCredit
from flowtracer.credit.flow import FlowCredit
from flowtracer.credit.random import RandomCredit
from flowtracer.credit.weights import Credit, compute_credit, token_weights

__all__ = ["RolloutCallback", "ScoreCredit", "UniformCredit", "FlowCredit", "RandomCredit", "EntropyCredit",
           "AttentionCredit", "Credit", "compute_credit", "token_weights"]
