"""flowtracer.integrations.trl: TRL's GRPOTrainer with per-token advantages from a credit arm.

Completions come from a scripted `rollout_func` (TRL's hook for an external generator, as vLLM
server mode is), so every test knows its rewards and answer spans: two prompts x four completions,
rewards 0/1 with non-zero variance in both groups, one completion without an answer and one truncated
one whose last number the rules refuse.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tiny import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from flowtracer.batch import Generated
from flowtracer.credit import FlowCredit, UniformCredit
from flowtracer.data.datamodule import DEFAULT_INSTRUCTION
from flowtracer.data.prompts import format_prompt, user_message
from flowtracer.errors import InputError
from flowtracer.generation import question_mask as suite_question_mask
from flowtracer.integrations.trl import FlowGRPOTrainer, check_trl_version, with_flowtracer
from flowtracer.model import prefix
from flowtracer.model.layers import resolve_layers
from flowtracer.model.policy import bundled_model_dir
from flowtracer.rewards import MathVerifier, VerifierCache
from flowtracer.train.step import micro
from flowtracer.train.step.score import rollout_batch, score_responses

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # rollout_func is "experimental" in TRL 1.16
G = 4
ANSWERS = {"What is 2+3?": "5", "Compute 7*6.": "42"}
SCRIPT = {  # (completion, ends with EOS)
    "What is 2+3?": [("2+3=5\n<answer>5</answer>", True), ("I think 6\n<answer>6</answer>", True),
                     ("The sum is 5.", True), ("no idea", True)],
    "Compute 7*6.": [("7*6=42 so \\boxed{42}", True), ("<answer>41</answer>", True), ("it is 42", True),
                     ("7*6 is 4", False)],
}
NO_ANSWER_ROWS = [3, 7]  # "no idea"; "7*6 is 4" is truncated and only the last-number rule finds it
VERIFIER = MathVerifier()


def reward(completions, answer, **_):
    return [VERIFIER(c[0]["content"], a).reward for c, a in zip(completions, answer)]


def scripted(tok):
    """A rollout_func: the prompt tokens TRL would build, and the scripted completions of each prompt."""
    def rollout(prompts, trainer):
        p_ids, c_ids, seen = [], [], {}
        for p in prompts:
            q = question_in(p[-1]["content"])
            k = seen[q] = seen.get(q, -1) + 1
            text, eos = SCRIPT[q][k % G]
            p_ids.append(tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"])
            c_ids.append(tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []))
        return {"prompt_ids": p_ids, "completion_ids": c_ids, "logprobs": None}
    return rollout


def question_in(content: str) -> str:
    return next(q for q in ANSWERS if content.startswith(q))


def dataset() -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": user_message(q, DEFAULT_INSTRUCTION)}],
                               "question": q, "answer": a} for q, a in ANSWERS.items()])


@functools.lru_cache(maxsize=None)
def policy(name: str):
    if name == "tiny":
        model, tok = tiny_model("llama"), tiny_tokenizer()
    else:
        path = bundled_model_dir("smollm2-135m-instruct")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def make(cls, tmp_path, name="tiny", config=None, **kw):
    model, tok = policy(name)
    args = GRPOConfig(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                                max_completion_length=32, temperature=0.9, beta=0.0, learning_rate=1e-2, max_steps=2,
                                use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                                shuffle_dataset=False, disable_tqdm=True, gradient_checkpointing=False),
                         **(config or {})})
    trainer = cls(model=copy.deepcopy(model), reward_funcs=reward, args=args, train_dataset=dataset(),
                  processing_class=tok, rollout_func=scripted(tok), **kw)
    trainer.model.train()
    return trainer


def step_inputs() -> list[dict]:
    return [dict(row) for row in dataset() for _ in range(G)]


def suite_weights(tok, model, out, inputs, arm) -> torch.Tensor:
    """The Lightning suite on TRL's batch: prompt formatting + question mask, the verifier's answer spans
    (score_responses), and the arm in the module's micro-batched pre-pass."""
    p_ids, p_mask, c_ids, c_mask = out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]
    (B, P), C = p_ids.shape, c_ids.shape[1]
    offsets, spans = torch.zeros(B, P, 2, dtype=torch.long), []
    for b, row in enumerate(inputs):
        text, span = format_prompt(tok, row["question"], instruction=DEFAULT_INSTRUCTION)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == p_ids[b, p_mask[b].bool()].tolist()  # the prompt TRL built
        offsets[b, P - len(enc["input_ids"]):] = torch.tensor(enc["offset_mapping"])
        spans.append(span)
    none_p, none_c = torch.zeros(B, P, dtype=torch.bool), torch.zeros(B, C, dtype=torch.bool)
    truncated = torch.tensor([not SCRIPT[r["question"]][b % G][1] for b, r in enumerate(inputs)])
    gen = Generated(input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=torch.cat([p_mask, c_mask], 1),
                    prompt_mask=torch.cat([p_mask.bool(), none_c], 1),
                    response_mask=torch.cat([none_p, c_mask.bool()], 1),
                    question_mask=torch.cat([suite_question_mask(offsets, p_mask, spans), none_c], 1),
                    responses=tok.batch_decode(c_ids, skip_special_tokens=True), truncated=truncated, prompt_len=P)
    rb = rollout_batch(gen, score_responses(tok, VerifierCache(), inputs, gen), prompts=[], answers=[], group_size=G)
    module = SimpleNamespace(tokenizer=tok, rl_step=0)
    pre = micro.pre_pass(model, rb, micro_batch_size=2 * G, temperature=0.9, capture_layers=arm.capture_layers,
                         run_callbacks=lambda view: arm.on_rollout_batch(None, module, view), with_reference=False,
                         logits_bytes=None)
    return pre.token_weights[:, P:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "bundled"])
def test_advantages_are_group_advantage_times_the_suites_flow_weights(tmp_path, name, monkeypatch):
    """The separate capture pass, right after TRL scored the batch: each prompt runs once for its G
    completions, the forward stops at the attention of the last captured layer, and the weights are
    those of the suite's full forward."""
    trainer = make(FlowGRPOTrainer, tmp_path, name, credit=FlowCredit(layers="middle"), fuse=False)
    inputs = step_inputs()
    plain = GRPOTrainer._generate_and_score_completions(trainer, inputs)["advantages"]  # TRL's own, (B,)
    packs, real = [], prefix.pack_inputs
    monkeypatch.setattr(prefix, "pack_inputs", lambda pack, device: packs.append(pack.rows) or real(pack, device))
    layers, mlps = trainer.model.model.layers, []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_a, i=i: mlps.append(i)) for i, layer in enumerate(layers)]
    try:
        out = trainer._generate_and_score_completions(inputs)
    finally:
        for h in hooks:
            h.remove()
    assert packs == [list(range(G)), list(range(G, 2 * G))]
    last = resolve_layers("middle", len(layers))[-1]
    assert mlps == list(range(last)) * 2  # one forward per prompt, no MLP from the last captured layer on
    expected = plain[:, None] * suite_weights(trainer.processing_class, trainer.model, out, inputs, FlowCredit())
    assert plain.shape == (2 * G,) and out["advantages"].shape == out["completion_ids"].shape
    torch.testing.assert_close(out["advantages"], expected, atol=1e-6, rtol=0)
    w = expected / plain[:, None]
    assert (w == 1.5).any(-1).sum() == 2 * G - len(NO_ANSWER_ROWS)  # flow picked hubs in every answered row
    for row in NO_ANSWER_ROWS:  # no answer span: all-ones weights, and counted
        torch.testing.assert_close(out["advantages"][row], plain[row] * out["completion_mask"][row].float())
    m = trainer._metrics["train"]
    assert m["credit/no_answer_frac"][-1] == pytest.approx(len(NO_ANSWER_ROWS) / (2 * G))
    assert m["credit/fallback_frac"][-1] >= len(NO_ANSWER_ROWS) / (2 * G)
    assert m["credit/reached_frac"][-1] == 1.0 and m["credit/seconds"][-1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "bundled"])
def test_fused_weights_come_from_the_loss_forward_and_reach_the_loss(tmp_path, name):
    """Fused (the default for FlowCredit with one iteration): the map of TRL's own loss forward gives the
    suite's weights, and the loss TRL computes is plain GRPO's loss on those (B, C) advantages."""
    ours = make(FlowGRPOTrainer, tmp_path / "ours", name, credit=FlowCredit(layers="middle"))
    plain = make(GRPOTrainer, tmp_path / "plain", name)
    assert ours.fuse_credit
    inputs = step_inputs()
    out = ours._generate_and_score_completions(inputs)
    assert out["advantages"].shape == (2 * G,)  # the weights wait for the loss forward
    base = out["advantages"].clone()
    expected = base[:, None] * suite_weights(ours.processing_class, ours.model, out, inputs, FlowCredit())
    ours.current_gradient_accumulation_steps = plain.current_gradient_accumulation_steps = 1
    loss = ours.compute_loss(ours.model, out)
    torch.testing.assert_close(out["advantages"], expected, atol=1e-6, rtol=0)
    reference = plain._generate_and_score_completions(step_inputs())
    assert torch.equal(reference["advantages"], base)
    assert torch.equal(loss, plain.compute_loss(plain.model, {**reference, "advantages": expected}))
    m = ours._metrics["train"]
    assert m["credit/no_answer_frac"][-1] == pytest.approx(len(NO_ANSWER_ROWS) / (2 * G))
    assert 0 < m["credit/forward_seconds"][-1] <= m["credit/seconds"][-1]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])  # TRL's default is dapo
def test_uniform_arm_gives_plain_grpo_loss_and_gradients_exactly(tmp_path, loss_type):
    ours = make(FlowGRPOTrainer, tmp_path / "ours", config={"loss_type": loss_type}, credit=UniformCredit())
    plain = make(GRPOTrainer, tmp_path / "plain", config={"loss_type": loss_type})
    losses, grads = [], []
    for trainer in (ours, plain):
        trainer.current_gradient_accumulation_steps = 1  # set by train(); the loss reads it
        inputs = trainer._generate_and_score_completions(step_inputs())
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in trainer.model.parameters()])
    assert torch.equal(losses[0], losses[1])  # (0 for on-policy "grpo": advantages sum to 0 per group)
    assert all(g0 is not None and torch.equal(g0, g1) for g0, g1 in zip(*grads))
    assert any(bool(g.abs().sum() > 0) for g in grads[0])


@pytest.mark.parametrize("fuse", [None, False], ids=["fused", "pass"])
def test_two_steps_with_lora_move_the_adapters_and_log_the_credit(tmp_path, fuse):
    from peft import LoraConfig

    trainer = make(FlowGRPOTrainer, tmp_path, credit=FlowCredit(layers=[2, 3]), fuse=fuse,
                   peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.fuse_credit == (fuse is None)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b and all(not torch.equal(before[n], after[n]) for n in lora_b)
    steps = [h for h in trainer.state.log_history if "reward" in h]
    assert len(steps) == 2 and all(h["reward_std"] > 0 for h in steps)
    for h in steps:
        assert h["credit/no_answer_frac"] == pytest.approx(len(NO_ANSWER_ROWS) / (2 * G))
        assert h["credit/reached_frac"] == 1.0 and 0.3 < h["credit/selected_frac"] < 0.5 and h["credit/seconds"] > 0


def test_fused_over_two_micro_batches_weights_each_loss_and_logs_once_per_generation(tmp_path):
    """steps_per_generation 2: TRL shuffles and splits the generation batch; each half's loss forward
    gives that half's weights, and the two halves' stats make one entry over the whole batch."""
    seen = []

    class Spy(FlowGRPOTrainer):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            seen.append((inputs["advantages"].clone(), inputs["completion_mask"].clone()))
            return loss

    config = {"per_device_train_batch_size": G, "gradient_accumulation_steps": 2}
    trainer = make(Spy, tmp_path, config=config, credit=FlowCredit(layers=[2, 3]))
    assert trainer.fuse_credit and trainer.args.steps_per_generation == 2
    trainer.train()
    assert len(seen) == 4  # two optimizer steps x two micro-batches of G rows
    for adv, mask in seen:
        assert adv.shape == mask.shape and adv.shape[0] == G  # (B, C): the weights reached this loss
    w = torch.cat([adv / adv.abs().amax(-1, keepdim=True).clamp_min(1e-12) for adv, _ in seen])
    assert bool((w.abs() < 1 - 1e-6).logical_and(torch.cat([m for _, m in seen]).bool()).any())  # not uniform
    steps = [h for h in trainer.state.log_history if "reward" in h]
    assert len(steps) == 2 and len(trainer._credit_parts) == 0
    for h in steps:  # row-weighted over both halves = the whole generation batch's share
        assert h["credit/no_answer_frac"] == pytest.approx(len(NO_ANSWER_ROWS) / (2 * G))
        assert h["credit/reached_frac"] == 1.0 and h["credit/seconds"] >= h["credit/forward_seconds"] > 0


def test_a_batch_of_no_answers_warns_once(tmp_path):
    trainer = make(FlowGRPOTrainer, tmp_path, credit=FlowCredit(layers=[2, 3]), extraction=["hash"], fuse=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = trainer._generate_and_score_completions(step_inputs())
        trainer._generate_and_score_completions(step_inputs())
    ours = [str(w.message) for w in seen if "FlowTracer:" in str(w.message)]
    assert len(ours) == 1 and "100% of a batch's responses got uniform weights" in ours[0]
    assert trainer._metrics["train"]["credit/no_answer_frac"][-1] == 1.0
    w = out["advantages"] / GRPOTrainer._generate_and_score_completions(trainer, step_inputs())["advantages"][:, None]
    torch.testing.assert_close(w.nan_to_num(1.0) * out["completion_mask"], out["completion_mask"].float())


def test_with_flowtracer_wraps_a_subclass_and_refuses_bad_arguments(tmp_path):
    class MyGRPO(GRPOTrainer):
        pass

    cls = with_flowtracer(MyGRPO)
    assert issubclass(cls, MyGRPO) and cls.__name__ == "FlowTracerMyGRPO"
    trainer = make(cls, tmp_path, credit=FlowCredit(layers=[2, 3]), fuse=False)
    out = trainer._generate_and_score_completions(step_inputs())
    assert out["advantages"].shape == out["completion_ids"].shape
    with pytest.raises(InputError, match="not a subclass of trl.GRPOTrainer"):
        with_flowtracer(dict)
    with pytest.raises(InputError, match="not a credit arm"):
        make(FlowGRPOTrainer, tmp_path, credit="flow")
    with pytest.raises(InputError, match="unknown extractor"):
        make(FlowGRPOTrainer, tmp_path, credit=FlowCredit(), extraction=["boxd"])
    for arm, config in ((UniformCredit(), {}), (FlowCredit(), {"num_iterations": 2})):
        with pytest.raises(InputError, match="fuse=True needs an arm that reads only the attention map"):
            make(FlowGRPOTrainer, tmp_path, config=config, credit=arm, fuse=True)
    assert not make(FlowGRPOTrainer, tmp_path, config={"num_iterations": 2}, credit=FlowCredit()).fuse_credit


def test_an_untested_trl_version_is_refused_in_one_line(monkeypatch):
    import importlib.util

    import trl

    import flowtracer.integrations.trl as adapter

    check_trl_version("1.16.0")
    check_trl_version("1.16.4")
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=r"tested with trl>=1\.16,<1\.17, found trl") as err:
            check_trl_version(version)
        assert "\n" not in str(err.value) and "pip install 'flowtracer[trl]'" in str(err.value)
    # on import: a fresh copy of the module, executed under another TRL version
    monkeypatch.setattr(trl, "__version__", "1.15.0")
    spec = importlib.util.spec_from_file_location("fresh_trl_adapter", adapter.__file__)
    with pytest.raises(ImportError, match="found trl 1.15.0"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
