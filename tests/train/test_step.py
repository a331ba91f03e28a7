"""The RL step (flowtracer.train.module + flowtracer.train.step) on a tiny random Llama with LoRA.

Rewards come from `toy_rewards:digits`, which gives groups non-zero reward variance and an
answer span, so advantages, gradients and weight updates are real (asserted in every test).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from lightning.pytorch import Callback, Trainer

import flowtracer.credit.flow as flow_mod
import flowtracer.train.module as module_mod
import flowtracer.train.step.micro as micro_mod
from flowtracer.config import LoraSpec, LossConfig, OptimConfig, SamplingConfig
from flowtracer.credit import EntropyCredit, FlowCredit, RandomCredit, UniformCredit
from flowtracer.data import PromptDataModule
from flowtracer.tools.trace import TraceCallback
from flowtracer.train.module import GRPOModule
from flowtracer.train.step import PhaseTimer, Placement, plan_credit

REAL_PASS = micro_mod.teacher_forced_pass
REAL_LOSS = module_mod.policy_loss


class Recording(Callback):
    """Per optimizer step: the trainable gradients; per loss call: what the loss was given."""

    def __init__(self):
        self.grads, self.loss_calls, self.start, self.end = [], [], {}, {}

    def on_train_start(self, trainer, pl_module):
        self.start = lora_state(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.end = lora_state(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.requires_grad and p.grad is not None})


def fit(model_dir, tmp_path, *, arms=(), monkeypatch=None, steps=1, temperature=1.0, beta=0.0, fuse=True,
        checkpointing=False, share_prefix=True, **optim):
    """Run `steps` RL steps; returns (module, recorder, forward-call log [(batch rows, with_grad, layers, heads)])."""
    rec, calls = Recording(), []
    if monkeypatch is not None:
        def counting(*args, **kwargs):
            calls.append((args[1].shape[0], kwargs.get("with_grad", False), kwargs.get("capture_layers"),
                          kwargs.get("capture_heads")))
            return REAL_PASS(*args, **kwargs)

        def loss_spy(logp, old, adv, resp, **kw):
            rec.loss_calls.append({"old": old.detach().clone(), "resp": resp.clone(), "adv": adv.clone(),
                                   "weights": kw["token_weights"].detach().clone()})
            return REAL_LOSS(logp, old, adv, resp, **kw)

        monkeypatch.setattr(micro_mod, "teacher_forced_pass", counting)
        monkeypatch.setattr(module_mod, "policy_loss", loss_spy)
    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_source=None, val_size=4,
                          prompts_per_step=2, cache_dir=str(tmp_path / "cache"), verifier="toy_rewards:digits")
    module = GRPOModule(
        model=model_dir, lora=LoraSpec(r=4, alpha=8), gradient_checkpointing=checkpointing,
        sampling=SamplingConfig(num_generations=4, max_new_tokens=12, temperature=temperature),
        loss=LossConfig(beta=beta), optim=OptimConfig(lr=1e-2, **optim), val_before_training=False,
        log_rollouts=False, fuse_credit=fuse, share_prefix=share_prefix)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[*arms, rec], default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    return module, rec, calls


def lora_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def assert_real_update(rec: Recording) -> None:
    """Advantages and some gradient were non-zero, and the trainable weights moved."""
    assert any(bool((c["adv"] != 0).any()) for c in rec.loss_calls) or not rec.loss_calls
    assert rec.grads and any(bool((g != 0).any()) for grads in rec.grads for g in grads.values())
    assert rec.start.keys() == rec.end.keys() and rec.start
    assert any(not torch.equal(rec.start[k], rec.end[k]) for k in rec.start), "no trainable weight changed"


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


class RecordsViews:
    """Mixin for a credit arm: keeps the fields of every view it was given (`keep`), after scoring it."""

    keep: tuple[str, ...] = ()

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[dict] = []

    def on_rollout_batch(self, trainer, pl_module, rollouts):
        super().on_rollout_batch(trainer, pl_module, rollouts)
        names = {"weights": "token_weights", "ids": "input_ids", "mask": "attention_mask", "resp": "response_mask",
                 "entropy": "entropies", "attn": "attn"}
        self.seen.append({k: getattr(rollouts, names[k]).clone() for k in self.keep})


class RecordingFlow(RecordsViews, FlowCredit):
    keep = ("attn", "weights", "ids", "mask")


class RecordingEntropy(RecordsViews, EntropyCredit):
    keep = ("entropy", "ids", "mask", "resp")


def reference_stats(policy, ids, mask, temperature):
    """log p(token) and entropies of log_softmax(logits / T) from a plain HF forward (the reference)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
                                 / temperature, -1)
    lp = torch.zeros(ids.shape)
    lp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = torch.zeros(ids.shape)
    ent[:, 1:] = -(logp[:, :-1].exp() * logp[:, :-1]).sum(-1)
    return lp, ent


# ----------------------------------------------------------------------------- defect 1: temperature
@pytest.mark.parametrize("temperature", [0.5, 0.7])
def test_logprobs_and_entropies_are_taken_at_the_sampling_temperature(tmp_path, tiny_model_dir, monkeypatch,
                                                                       temperature):
    """The old log-probs the loss gets and the entropies the arm reads equal log_softmax(logits / T)
    of a plain HF forward. The warm-up keeps the learning rate ~1e-9, so the policy that computed
    them is the final one (to float noise)."""
    arm = RecordingEntropy()
    module, rec, _ = fit(tiny_model_dir, tmp_path, arms=[arm], monkeypatch=monkeypatch, temperature=temperature,
                         warmup_steps=10**9)
    (seen,), (call,) = arm.seen, rec.loss_calls
    module.policy.eval()
    lp, ent = reference_stats(module.policy, seen["ids"], seen["mask"], temperature)
    resp = seen["resp"].bool()
    torch.testing.assert_close(call["old"][resp], lp[resp], atol=1e-4, rtol=0)
    torch.testing.assert_close(seen["entropy"][resp], ent[resp], atol=1e-4, rtol=0)
    lp1, _ = reference_stats(module.policy, seen["ids"], seen["mask"], 1.0)
    assert (lp1[resp] - lp[resp]).abs().max() > 0.05  # the check can tell T from 1


def test_greedy_sampling_scores_at_temperature_one():
    from flowtracer.train.step import logprob_temperature

    assert logprob_temperature(0.0) == 1.0 and logprob_temperature(0.8) == 0.8


# ----------------------------------------------------------------------------- defect 2: micro-batches
def test_every_micro_batch_trains_when_no_arm_sets_weights(tmp_path, tiny_model_dir, monkeypatch):
    """A callback inside the forward that sets no weights (the trace pages) must leave every
    micro-batch with all-ones weights, not the zeros a shared buffer would hand the next one."""
    trace = TraceCallback(every_n_steps=1, num_rollouts=1)
    _, rec, calls = fit(tiny_model_dir, tmp_path, arms=[trace], monkeypatch=monkeypatch, micro_batch_size=3)
    assert [c[0] for c in calls] == [3, 3, 2]  # 8 rollouts in micro-batches of 3
    assert len(rec.loss_calls) == 3
    for call in rec.loss_calls:
        assert torch.equal(call["weights"], call["resp"].float())
    assert_real_update(rec)


def test_per_micro_batch_credit_gives_the_whole_batch_gradient(tmp_path, tiny_model_dir, monkeypatch):
    g_whole = fit(tiny_model_dir, tmp_path / "a", arms=[RecordingFlow()])[1]
    arm = RecordingFlow()
    _, rec, calls = fit(tiny_model_dir, tmp_path / "b", arms=[arm], monkeypatch=monkeypatch, micro_batch_size=3)
    assert [c[:2] for c in calls] == [(3, True), (3, True), (2, True)]  # no separate pass
    assert len(arm.seen) == 3 and all((s["weights"] == 1.5).any() for s in arm.seen)
    assert_same(rec.grads[0], g_whole.grads[0])
    assert_real_update(rec)


def test_two_weight_setting_arms_are_refused():
    with pytest.raises(ValueError, match="FlowCredit, EntropyCredit.*keep one"):
        plan_credit([FlowCredit(), EntropyCredit()], ppo_epochs=1, mini_batches=1, micro_batch_size=0, batch_size=8)
    plan = plan_credit([FlowCredit(), TraceCallback()], ppo_epochs=1, mini_batches=1, micro_batch_size=0,
                       batch_size=8)  # a callback that sets no weights may sit beside an arm
    assert [p for _, p in plan.placements] == [Placement.IN_FORWARD, Placement.BEFORE_UPDATE]


@pytest.mark.parametrize("fuse", [True, False], ids=["in-forward", "pre-pass"])
def test_heads_max_and_reachability_reach_the_step(tmp_path, tiny_model_dir, monkeypatch, fuse):
    """FlowCredit(heads="max") makes every pass that captures the map take the head maximum (rows of
    a head maximum sum to more than 1), and the update is real; arms that disagree are refused."""
    arm = RecordingFlow(heads="max", inject="reachability")
    arm.keep = ("weights", "attn", "mask", "resp")
    _, rec, calls = fit(tiny_model_dir, tmp_path, arms=[arm], monkeypatch=monkeypatch, fuse=fuse)
    captured = [c for c in calls if c[2] is not None]
    assert captured and all(c[3] == "max" for c in captured)
    valid = arm.seen[0]["mask"].bool()
    assert (arm.seen[0]["attn"].sum(-1)[valid] > 1 + 1e-3).any()  # a head maximum, not a softmax average
    assert_real_update(rec)
    with pytest.raises(ValueError, match="head aggregations"):
        plan_credit([FlowCredit(heads="max"), TraceCallback(), AttentionNeeding()], ppo_epochs=1, mini_batches=1,
                    micro_batch_size=0, batch_size=8)


class AttentionNeeding(Callback):
    """A callback that reads the mean-head map and sets no weights."""

    needs_attention, needs_entropy, batch_global, sets_weights = True, False, False, False
    capture_layers, capture_heads = "middle", "mean"


# ----------------------------------------------------------------------------- defect 4: pre-pass bounded
@pytest.mark.parametrize("arm,optim,fuse", [
    (FlowCredit(), {"ppo_epochs": 2}, True),
    (FlowCredit(), {}, False),
    (EntropyCredit(variant="80/20"), {}, True),
    (RandomCredit(), {"mini_batches": 2}, True),
], ids=["flow-2-epochs", "flow-unfused", "entropy-80/20", "random-2-minibatches"])
def test_every_pass_and_flow_solve_holds_one_micro_batch(tmp_path, tiny_model_dir, monkeypatch, arm, optim, fuse):
    solves = []
    real_trace = flow_mod.trace_flow

    def trace_spy(attn, *a, **k):
        solves.append(attn.shape[0])
        return real_trace(attn, *a, **k)

    monkeypatch.setattr(flow_mod, "trace_flow", trace_spy)
    _, rec, calls = fit(tiny_model_dir, tmp_path, arms=[arm], monkeypatch=monkeypatch, fuse=fuse,
                        micro_batch_size=2, **optim)
    assert calls and max(c[0] for c in calls) <= 2
    assert max(solves, default=0) <= 2
    if isinstance(arm, FlowCredit):
        assert len(solves) == 4  # 8 rollouts, micro-batches of 2, each solved once
    assert_real_update(rec)


# ----------------------------------------------------------------------------- defect 5: NaN in the map
@pytest.mark.parametrize("fuse", [True, False], ids=["in-forward", "pre-pass"])
def test_a_non_finite_attention_map_skips_the_update_and_is_counted(tmp_path, tiny_model_dir, monkeypatch, fuse):
    """A NaN in step 0's map: that update is skipped and counted, the weights stay; step 1 trains."""
    snapshots = []

    class Snapshots(Callback):
        def on_train_start(self, trainer, pl_module):
            snapshots.append(lora_state(pl_module))

        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(lora_state(pl_module))

    def poisoned(*args, **kwargs):
        out = REAL_PASS(*args, **kwargs)
        if out.attn is not None and len(snapshots) == 1:  # only during the first step
            out.attn[0, -1, 0] = float("nan")
        return out

    monkeypatch.setattr(micro_mod, "teacher_forced_pass", poisoned)
    module, rec, _ = fit(tiny_model_dir, tmp_path, arms=[FlowCredit(), Snapshots()], fuse=fuse)
    assert module.guard.skips.total == 1 and module.rl_step == 2  # max_steps counts applied updates
    assert len(rec.grads) == 1  # one optimizer step ran: step 1's
    start, after_skip, after_step = snapshots
    assert all(torch.equal(after_skip[k], start[k]) for k in start)
    assert any(not torch.equal(after_step[k], start[k]) for k in start)


# ----------------------------------------------------------------------------- defect 6: CUDA timing
def test_phase_timer_synchronises_cuda_at_phase_boundaries(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    timer = PhaseTimer(torch.device("cuda", 0))
    with timer("credit"):
        n_inside = len(syncs)
    assert n_inside >= 2 and len(syncs) >= 3  # at creation, entering and leaving the phase
    syncs.clear()
    cpu = PhaseTimer("cpu")
    with cpu("credit"):
        pass
    assert syncs == [] and cpu.seconds["credit"] >= 0


# ----------------------------------------------------------------------------- the plan and the weights
def test_fused_and_separate_pass_agree_and_checkpointing_changes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    sep = RecordingFlow()
    _, g_sep, calls = fit(tiny_model_dir, tmp_path / "a", arms=[sep], fuse=False, monkeypatch=monkeypatch)
    assert [c[1] for c in calls] == [False, True]  # the no-grad pass, then the training forward
    monkeypatch.undo()
    fused = RecordingFlow()
    _, g_fused, _ = fit(tiny_model_dir, tmp_path / "b", arms=[fused])
    ckpt = RecordingFlow()
    _, g_ckpt, _ = fit(tiny_model_dir, tmp_path / "c", arms=[ckpt], checkpointing=True)
    for other in (fused, ckpt):
        torch.testing.assert_close(other.seen[0]["attn"], sep.seen[0]["attn"], atol=1e-6, rtol=1e-5)
        assert torch.equal(other.seen[0]["weights"], sep.seen[0]["weights"])
    assert (sep.seen[0]["weights"] == 1.5).any()
    assert_same(g_fused.grads[0], g_sep.grads[0])
    assert_same(g_ckpt.grads[0], g_sep.grads[0])
    assert_real_update(g_sep)


def spy_packs(monkeypatch) -> list[list[int]]:
    """The rows of every pack the step's forwards run (flowtracer.model.prefix), in call order."""
    packs, real = [], module_mod.prefix.pack_inputs

    def spy(pack, device):
        packs.append(list(pack.rows))
        return real(pack, device)

    monkeypatch.setattr(module_mod.prefix, "pack_inputs", spy)
    return packs


def test_packed_prompts_give_the_padded_steps_update(tmp_path, tiny_model_dir, monkeypatch):
    """share_prefix (a prompt run once for its G rows) against the padded forward: the same map, credit
    weights and gradients, in the loss forward and the reference (KL) forward alike."""
    packs = spy_packs(monkeypatch)
    runs = {}
    for share in (False, True):
        arm = RecordingFlow()
        _, rec, _ = fit(tiny_model_dir, tmp_path / str(share), arms=[arm], beta=0.1, share_prefix=share)
        runs[share] = arm, rec, [len(rows) for rows in packs]
        packs.clear()
    (padded_arm, padded, none), (packed_arm, packed, used) = runs[False], runs[True]
    assert none == [] and used == [4, 4] * 2  # reference and loss forwards: each of the 2 prompts once for 4 rows
    torch.testing.assert_close(packed_arm.seen[0]["attn"], padded_arm.seen[0]["attn"], atol=1e-6, rtol=1e-5)
    assert torch.equal(packed_arm.seen[0]["weights"], padded_arm.seen[0]["weights"])
    assert_same(packed.grads[0], padded.grads[0], atol=1e-5)
    assert_real_update(packed)


def test_shuffled_mini_batches_keep_a_prompts_rows_together(tmp_path, tiny_model_dir, monkeypatch):
    """Mini-batches draw rows at random; within one the rows go in batch order, so rows of a prompt sit
    side by side and its micro-batch forward packs them."""
    packs = spy_packs(monkeypatch)
    _, rec, _ = fit(tiny_model_dir, tmp_path, arms=[UniformCredit()], mini_batches=2)
    assert len(rec.grads) == 2 and packs[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the no-grad pre-pass: whole batch
    # then two mini-batches of 4 random rows (2 prompts x 4): every row goes into a pack of its prompt's rows
    assert sum(len(r) for r in packs[2:]) == 8 and max(len(r) for r in packs[2:]) >= 2, packs
    assert_real_update(rec)


def test_kl_and_ppo_epochs_move_the_weights(tmp_path, tiny_model_dir, monkeypatch):
    _, rec, calls = fit(tiny_model_dir, tmp_path, arms=[UniformCredit()], monkeypatch=monkeypatch,
                        beta=0.1, ppo_epochs=2, mini_batches=2, micro_batch_size=2)
    assert len(rec.grads) == 2 * 2  # epochs x mini-batches (max_steps counts optimizer steps)
    assert max(c[0] for c in calls) <= 2
    assert_real_update(rec)  # the weights moved


# ----------------------------------------------------------------------------- defect 3: answer spans
def test_a_truncated_response_gets_no_fallback_answer_span():
    """The last number of a cut-off derivation is no answer: no reward, no flow sink, counted."""
    from tiny import tiny_tokenizer

    from flowtracer.rewards import VerifierCache
    from flowtracer.tools.analysis import given_responses
    from flowtracer.train.step.score import rollout_batch, score_responses

    tok = tiny_tokenizer()
    texts = ["3 + 4 = 7, then 7 +", "3 + 4 = 7, then 7 +", "The sum is \\boxed{7} and", "<answer>7</answer>"]
    gen = given_responses(tok, ["q"] * 4, [None] * 4, texts)
    gen.truncated = torch.tensor([True, False, True, True])  # row 1: the same text, finished
    rows = [{"question": "q", "answer": "7"}] * 4
    scored = score_responses(tok, VerifierCache(), rows, gen)
    assert scored.rewards.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert not scored.answer_mask[0].any() and scored.answer_mask[1:].any(-1).all()
    assert scored.truncated_fallback == 1 and scored.no_span == 1
    rb = rollout_batch(gen, scored, prompts=["q"] * 4, answers=["7"] * 4, group_size=4)
    assert rb.metrics["answer/no_span"] == 1.0 and rb.metrics["answer/truncated_fallback"] == 1.0


def test_a_bare_float_reward_gets_its_answer_span_from_the_row_extractors():
    """A reward function returning a float keeps its reward; the answer tokens are found by the
    row's extractors (data.answer_extraction), independently of the reward, and marked as the sink."""
    from tiny import tiny_tokenizer

    from flowtracer.rewards import VerifierCache
    from flowtracer.tools.analysis import given_responses
    from flowtracer.train.step.score import score_responses

    tok = tiny_tokenizer()
    texts = ["so <answer>42</answer> ok", "the box \\boxed{9} here", "no marker at all",
             "<answer>5</answer> \\boxed{6}"]
    gen = given_responses(tok, ["q"] * 4, [None] * 4, texts)
    gen.truncated = torch.tensor([False, False, False, False])
    base = {"question": "q", "answer": "1", "verifier": "faulty_rewards:varied"}  # a float: digits mod 3, / 2
    scored = score_responses(tok, VerifierCache(), [base] * 4, gen)
    assert scored.rewards.tolist() == [(sum(c.isdigit() for c in t) % 3) / 2 for t in texts]
    marked = [tok.decode(gen.input_ids[i][scored.answer_mask[i]]) for i in range(4)]
    assert marked == ["42", "9", "", "5"] and scored.no_span == 1  # default order: answer tag, box, ####, number
    only_box = score_responses(tok, VerifierCache(), [{**base, "answer_extraction": ["boxed"]}] * 4, gen)
    marked = [tok.decode(gen.input_ids[i][only_box.answer_mask[i]]) for i in range(4)]
    assert marked == ["", "9", "", "6"] and only_box.rewards.tolist() == scored.rewards.tolist()
    # a cut-off response: a span the last_number fallback found is dropped, the function's reward stays
    gen.truncated = torch.tensor([True, False, False, False])
    cut = score_responses(tok, VerifierCache(), [{**base, "answer_extraction": ["last_number"]}] * 4, gen)
    assert cut.rewards.tolist() == scored.rewards.tolist() and cut.truncated_fallback == 1
    assert not cut.answer_mask[0].any() and tok.decode(gen.input_ids[1][cut.answer_mask[1]]) == "9"
