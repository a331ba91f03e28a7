"""Credit arms: rollout callbacks that set per-token weights (one file per arm).

    trainer.callbacks:
      - class_path: flowtracer.credit.FlowCredit
        init_args: {top_frac: 0.4, gamma: 1.5}

`select` (token selection) and `stats` (token classes) are pure torch; the arms are Lightning
callbacks. Without Lightning installed (e.g. a bare GPU benchmark box) only the pure parts import:
`import flowtracer.credit.select` still works.
"""

try:
    import lightning.pytorch  # noqa: F401
except ImportError:  # the arms need Lightning; select/stats do not
    __all__ = []
else:
    from flowtracer.credit.attention import AttentionCredit
    from flowtracer.credit.base import RolloutCallback, ScoreCredit, UniformCredit
    from flowtracer.credit.entropy import EntropyCredit
    from flowtracer.credit.flow import FlowCredit
    from flowtracer.credit.random import RandomCredit

    __all__ = ["RolloutCallback", "ScoreCredit", "UniformCredit", "FlowCredit", "RandomCredit",
               "EntropyCredit", "AttentionCredit"]
