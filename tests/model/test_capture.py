"""flowtracer.model.capture: the captured map equals eager output_attentions averaged over layers and heads."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny import tiny_model

from flowtracer.model.capture import capture_attention, chunk_plan, resolve_layers
from flowtracer.model.forward import teacher_forced_pass

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
SELECTIONS = ["middle", "early", "late", "all", [1, 4]]
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return tiny_model(arch, seed=0)


def _batch(B: int = 3, T: int = 30, seed: int = 0):
    """Row 0 left-padded (prompt), row 1 right-padded (response), row 2 both, row 3+ unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :7] = 0
    if B > 1:
        mask[1, -5:] = 0
    if B > 2:
        mask[2, :3] = 0
        mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _eager_reference(model, ids, mask, layers, heads="mean"):
    """Mean of eager attentions over `layers` of the mean (or max) over all heads (padding zeroed);
    log-probs/entropies from full logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, output_attentions=True)
    finally:
        base.set_attn_implementation("sdpa")
    valid = mask.bool()
    pair = valid[:, :, None] & valid[:, None, :]
    per_head = [out.attentions[i] for i in layers]  # each (B, H, T, T): every head of the layer
    attn = torch.stack([a.mean(dim=1) if heads == "mean" else a.amax(dim=1) for a in per_head]).mean(dim=0)
    attn = attn.masked_fill(~pair, 0.0).nan_to_num(0.0)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    target = torch.zeros_like(valid)
    target[:, 1:] = valid[:, 1:] & valid[:, :-1]
    lp = torch.zeros(ids.shape)
    lp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = torch.zeros(ids.shape)
    ent[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1]
    return attn, lp * target, ent * target


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", SELECTIONS, ids=str)
def test_matches_eager_with_padding(arch, layers):
    model = _model(arch)
    ids, mask = _batch()
    out = teacher_forced_pass(model, ids, mask, capture_layers=layers)
    sel = resolve_layers(layers, model.config.num_hidden_layers)
    ref_attn, ref_lp, ref_ent = _eager_reference(model, ids, mask, sel)
    assert out.attn.dtype == torch.float32 and out.attn.shape == (3, 30, 30)
    assert out.layers == tuple(sel)
    torch.testing.assert_close(out.attn, ref_attn, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logprobs, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.entropy, ref_ent, atol=ATOL, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("arch", ARCHS)
def test_small_chunks_and_unpadded_paths(arch):
    """Many query chunks, and the no-padding path (sdpa's is_causal shortcut / Mistral's window mask)."""
    model = _model(arch)
    for B, T in ((1, 5), (2, 37)):  # T=5 < sliding window 6: sdpa gets no mask at all
        ids, mask = _batch(B=4, T=T, seed=B)
        ids, mask = ids[3:], mask[3:]  # an unpadded row
        ids, mask = ids.expand(B, T).clone(), mask.expand(B, T).clone()
        ref_attn, _, _ = _eager_reference(model, ids, mask, [0, 2, 5])
        out = teacher_forced_pass(model, ids, mask, capture_layers=[0, 2, 5], attn_chunk_bytes=1)
        torch.testing.assert_close(out.attn, ref_attn, atol=ATOL, rtol=0)
    ids, mask = _batch(B=3, T=33, seed=3)
    ref_attn, _, _ = _eager_reference(model, ids, mask, [2, 3])
    out = teacher_forced_pass(model, ids, mask, capture_layers=[2, 3], attn_chunk_bytes=3000, logits_chunk_bytes=1)
    torch.testing.assert_close(out.attn, ref_attn, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_padded_equals_unpadded(arch):
    """The valid block of a padded row equals the map/log-probs of the sequence alone; padding is exactly 0."""
    model = _model(arch)
    ids, mask = _batch(B=3, T=30, seed=5)
    out = teacher_forced_pass(model, ids, mask, capture_layers="all")
    for b in range(3):
        idx = mask[b].nonzero().squeeze(-1)
        alone = teacher_forced_pass(model, ids[b : b + 1, idx], capture_layers="all")
        block = out.attn[b][idx][:, idx]
        torch.testing.assert_close(block, alone.attn[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.logprobs[b, idx], alone.logprobs[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.entropy[b, idx], alone.entropy[0], atol=ATOL, rtol=0)
        pad = mask[b] == 0
        assert (out.attn[b][pad] == 0).all() and (out.attn[b][:, pad] == 0).all()
        assert (out.logprobs[b][pad] == 0).all() and (out.entropy[b][pad] == 0).all()
    # Rows are causal softmax averages: each valid row sums to 1 and the upper triangle is 0.
    valid = mask.bool()
    torch.testing.assert_close(out.attn.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5, rtol=0)
    assert (out.attn.triu(1) == 0).all()
    assert (out.logprobs[:, 0] == 0).all()


def test_peft_lora_wrapped():
    import peft
    model = tiny_model("qwen2", seed=1)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    ids, mask = _batch()
    out = teacher_forced_pass(lora, ids, mask, capture_layers="middle")
    ref_attn, ref_lp, ref_ent = _eager_reference(lora, ids, mask, resolve_layers("middle", 6))
    torch.testing.assert_close(out.attn, ref_attn, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logprobs, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.entropy, ref_ent, atol=ATOL, rtol=0)
    # The adapters matter: the base model's map is different.
    with lora.disable_adapter():
        base = teacher_forced_pass(lora, ids, mask, capture_layers="middle")
    assert (base.attn - out.attn).abs().max() > 1e-3
    assert model.config._attn_implementation == "sdpa"


def test_eager_model_and_temperature():
    model = tiny_model("llama", seed=2, attn_implementation="eager")
    ids, mask = _batch()
    out = teacher_forced_pass(model, ids, mask, capture_layers=None, temperature=0.7)
    assert out.attn is None and out.layers is None
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    ref = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * (mask[:, 1:] * mask[:, :-1])
    torch.testing.assert_close(out.logprobs[:, 1:], ref, atol=ATOL, rtol=0)
    capt = teacher_forced_pass(model, ids, mask, capture_layers="late")
    ref_attn, _, _ = _eager_reference(model, ids, mask, [4, 5])
    torch.testing.assert_close(capt.attn, ref_attn, atol=ATOL, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # _eager_reference restores sdpa
    model.set_attn_implementation("eager")
    teacher_forced_pass(model, ids, mask)
    assert model.config._attn_implementation == "eager"  # an eager model stays eager


def test_capture_during_training_forward_with_checkpointing():
    """Under autograd and gradient checkpointing: same map, nothing captured twice, gradients flow."""
    model = tiny_model("qwen3", seed=3)
    ids, mask = _batch()
    expected, _, _ = _eager_reference(model, ids, mask, [2, 3])  # "middle" of 6 layers
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    model.train()
    try:
        with capture_attention(model, "middle", attention_mask=mask) as cap:
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            out.logits.float().logsumexp(-1).mean().backward()  # recomputes the layers inside the context
    finally:
        disable()
        model.eval()
    assert not cap.attn.requires_grad
    torch.testing.assert_close(cap.attn, expected, atol=ATOL, rtol=0)
    assert all(p.grad is not None for p in model.model.layers[2].self_attn.parameters())
    # With grad: log-probs carry the graph, the map does not.
    res = teacher_forced_pass(model, ids, mask, capture_layers="middle", with_grad=True)
    assert res.logprobs.requires_grad and not res.attn.requires_grad


def test_logits_budget_chunks_recompute_in_backward_and_stats_mask():
    """A budget smaller than the logits: chunked, checkpointed log-probs = the one-chunk result,
    values and gradients; entropies never carry a graph; stats_mask limits the positions."""
    model = tiny_model("llama", seed=5)
    ids, mask = _batch(B=4, T=24, seed=2)
    _, lp_ref, ent_ref = _eager_reference(model, ids, mask, [0])
    resp = torch.zeros_like(mask, dtype=torch.bool)
    resp[:, 14:] = True
    results = {}
    for name, budget in (("whole", 1 << 30), ("chunked", 7 * 103 * 12)):  # ~7 positions per chunk
        model.zero_grad()
        out = teacher_forced_pass(model, ids, mask, capture_layers=None, with_grad=True,
                                  logits_chunk_bytes=budget, stats_mask=resp)
        assert out.logprobs.requires_grad and not out.entropy.requires_grad
        (out.logprobs * torch.linspace(-1, 1, out.logprobs.numel()).view_as(out.logprobs)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.logprobs.detach(), out.entropy, grads)
    model.zero_grad()
    (lp_w, ent_w, g_w), (lp_c, ent_c, g_c) = results["whole"], results["chunked"]
    keep = resp & mask.bool()
    keep[:, 1:] &= mask.bool()[:, :-1]
    torch.testing.assert_close(lp_w, lp_ref * keep, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent_w, ent_ref * keep, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp_c, lp_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent_c, ent_w, atol=1e-6, rtol=0)
    assert g_w.keys() == g_c.keys() and "lm_head.weight" in g_w
    g_ref = _reference_grads(model, ids, mask, keep)
    for n in g_w:
        torch.testing.assert_close(g_w[n], g_ref[n], atol=1e-6, rtol=1e-4, msg=n)
        torch.testing.assert_close(g_c[n], g_ref[n], atol=1e-6, rtol=1e-4, msg=n)


def _reference_grads(model, ids, mask, keep):
    """Gradients of the same weighted sum of log-probs, through a plain forward's full logits."""
    model.zero_grad()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(), -1)
    lp = torch.zeros(ids.shape)
    lp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp = lp * keep
    (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def test_layer_selection():
    assert resolve_layers("middle", 6) == [2, 3]
    assert resolve_layers("early", 6) == [0, 1]
    assert resolve_layers("late", 6) == [4, 5]
    assert resolve_layers("all", 6) == list(range(6))
    assert resolve_layers("middle", 30) == list(range(10, 20))
    assert resolve_layers("middle", 28) == list(range(9, 18))
    assert resolve_layers([3, 1, 3], 6) == [1, 3]
    with pytest.raises(ValueError, match=r"0\.\.5"):
        resolve_layers([0, 6], 6)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        teacher_forced_pass(_model("llama"), *_batch(), capture_layers=[-1])
    with pytest.raises(ValueError, match="middle"):
        resolve_layers("center", 6)
    with pytest.raises(ValueError, match="no layer"):
        resolve_layers("middle", 1)


def test_chunk_plan_skips_unreachable_keys():
    """Only causally reachable keys are computed; only columns that mask something are masked."""
    T, rows = 12, 4
    idx = torch.arange(T)
    causal = (idx[None, :] <= idx[:, None])[None, None]
    plan = chunk_plan(causal, None, rows, T)
    assert [(s, e, k0, k1) for s, e, k0, k1, _ in plan] == [(0, 4, 0, 4), (4, 8, 0, 8), (8, 12, 0, 12)]
    # Key 0..s is seen by every row of chunk [s, e): only the triangle [s+1, e) needs the mask.
    assert [segs for *_, segs in plan] == [[(1, 4)], [(5, 8)], [(9, 12)]]
    window = causal & (idx[None, :] > idx[:, None] - 3)[None, None]
    plan = chunk_plan(window, None, rows, T)
    assert [(k0, k1) for _, _, k0, k1, _ in plan] == [(0, 4), (2, 8), (6, 12)]


def test_config_restored_after_error_and_unsupported_models():
    model = _model("llama")
    ids, mask = _batch()
    with pytest.raises(KeyError):
        with capture_attention(model, "middle", attention_mask=mask):
            assert model.config._attn_implementation.startswith("flowtracer_")
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert "_flowtracer_capture" not in model.model.layers[2].self_attn.__dict__

    # A selected layer whose attention bypasses transformers' interface: one clear error naming the class.
    attn = model.model.layers[3].self_attn
    original = attn.forward

    def bypass(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        saved = attn.config._attn_implementation_internal
        attn.config._attn_implementation_internal = "sdpa"
        try:
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            **kwargs)
        finally:
            attn.config._attn_implementation_internal = saved

    attn.forward = bypass
    try:
        with pytest.raises(RuntimeError, match=r"LlamaForCausalLM.*\[3\]"):
            teacher_forced_pass(model, ids, mask, capture_layers="middle")
    finally:
        del attn.forward
    assert model.config._attn_implementation == "sdpa"

    class NotALM(torch.nn.Module):
        config = None

    with pytest.raises(ValueError, match="NotALM"):
        with capture_attention(NotALM()):
            pass


def test_capture_without_mask_reads_validity_from_model_mask():
    """Without attention_mask, padded rows/columns are found from the mask the model itself builds."""
    model = _model("mistral")
    ids, mask = _batch()
    expected, _, _ = _eager_reference(model, ids, mask, range(6))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), capture_attention(model, "all") as cap:
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(cap.attn, expected, atol=ATOL, rtol=0)


def test_backend_argument():
    model = _model("llama")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="backend"):
        teacher_forced_pass(model, ids, mask, backend="cuda")
    if not torch.cuda.is_available():  # the fused kernels need CUDA: asking for them on CPU is an error
        with pytest.raises(ValueError, match="triton"):
            teacher_forced_pass(model, ids, mask, backend="triton")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("layers", ["middle", [0, 3, 5]], ids=str)
def test_heads_max_matches_eager_per_head_maximum(arch, layers):
    """heads="max": each layer's element-wise maximum over its query heads (eager keeps every head),
    averaged over the layers; padded rows/columns zero; the same with many small query chunks."""
    model = _model(arch)
    ids, mask = _batch()
    sel = resolve_layers(layers, model.config.num_hidden_layers)
    ref, _, _ = _eager_reference(model, ids, mask, sel, heads="max")
    for budget in (None, 3000):
        out = teacher_forced_pass(model, ids, mask, capture_layers=layers, capture_heads="max",
                                  attn_chunk_bytes=budget)
        torch.testing.assert_close(out.attn, ref, atol=ATOL, rtol=0)
    mean = teacher_forced_pass(model, ids, mask, capture_layers=layers).attn
    valid = mask.bool()
    assert (out.attn >= mean - ATOL).all() and (out.attn - mean).abs().max() > 1e-3  # a different map
    assert (out.attn.sum(-1)[valid] >= 1 - ATOL).all()  # a head maximum: rows sum to at least 1


@pytest.mark.parametrize("heads", ["mean", "max"])
def test_per_layer_maps(heads):
    """per_layer keeps each layer's own map (= eager on that layer alone); attn is their mean."""
    model = _model("qwen3")
    ids, mask = _batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), capture_attention(model, "all", attention_mask=mask, heads=heads, per_layer=True) as cap:
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    assert list(cap.layer_attn) == list(range(6))
    for layer, m in cap.layer_attn.items():
        ref, _, _ = _eager_reference(model, ids, mask, [layer], heads=heads)
        torch.testing.assert_close(m, ref, atol=ATOL, rtol=0)
    ref_all, _, _ = _eager_reference(model, ids, mask, range(6), heads=heads)
    torch.testing.assert_close(cap.attn, ref_all, atol=ATOL, rtol=0)


def test_heads_argument():
    model = _model("llama")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="heads"):
        teacher_forced_pass(model, ids, mask, capture_heads="sum")
    with pytest.raises(ValueError, match="Triton"):
        teacher_forced_pass(model, ids, mask, capture_heads="max", backend="triton")
