"""Training: the GRPO LightningModule and everything that orchestrates one run.

module.py        GRPOModule: one RL step, top to bottom
refill.py        generate + score a step's rollouts, with DAPO's dynamic-sampling refill (takes callables)
validation.py    validation during fit, on the evaluation engine
preflight.py     every input check, before anything is written (ConfigError)
guards.py        numerical guards: non-finite values skip the update
distributed.py   DDP helpers: shard prompts, gather, synced logging
sft.py           the SFT LightningModule and data module (`flowtracer sft`), merged export
step/            Lightning-free pieces of one RL step: score, placement, micro-batches, timer (the
                 forward itself is flowtracer.model.forward)
"""
