"""Lightning-free pieces of one RL step (flowtracer.train.module orchestrates them, top to bottom;
the teacher-forced forward itself is flowtracer.model.forward, re-exported here):

score.py      verifier rewards, answer-token masks, the RolloutBatch and group advantages
placement.py  where each credit callback runs (an explicit enum: before the update, inside each
              micro-batch's training forward, or in a micro-batched no-grad pre-pass)
micro.py      micro-batches that own their outputs, the pre-pass, reassembly of (B, T) outputs
config.py     LossConfig and OptimConfig
timer.py      per-phase step timing (synchronised on CUDA)
"""

from flowtracer.config import LossConfig, OptimConfig
from flowtracer.model.forward import TeacherForcedOutput, logprob_temperature, teacher_forced_pass
from flowtracer.train.step.placement import CreditPlan, Placement, check_callbacks, plan_credit
from flowtracer.train.step.timer import PhaseTimer

__all__ = ["CreditPlan", "LossConfig", "OptimConfig", "PhaseTimer", "Placement", "TeacherForcedOutput",
           "check_callbacks", "logprob_temperature", "plan_credit", "teacher_forced_pass"]
