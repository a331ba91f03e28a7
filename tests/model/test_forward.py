"""flowtracer.model.forward: the map-only pass (token_stats=False) stops at the attention of the last captured
layer, runs a prompt shared by several rows once, and gives the map of the full pass."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from flowtracer.model import prefix
from flowtracer.model.forward import teacher_forced_pass


def _batch(B: int = 3, T: int = 24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0  # a left-padded prompt
    mask[1, -4:] = 0  # a right-padded response
    return ids.masked_fill(mask == 0, 0), mask


def _layer_calls(model) -> tuple[list[int], list]:
    calls: list[int] = []
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    handles = [layer.register_forward_pre_hook(lambda *_a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    return calls, handles


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("layers", ["middle", "early", [1, 3], "late"], ids=str)
def test_map_only_equals_the_full_pass_and_stops_early(arch, layers):
    model = tiny_model(arch)
    ids, mask = _batch()
    full = teacher_forced_pass(model, ids, mask, capture_layers=layers)
    calls, handles = _layer_calls(model)
    try:
        only = teacher_forced_pass(model, ids, mask, capture_layers=layers, token_stats=False)
        ran, calls[:] = list(calls), []
        whole = teacher_forced_pass(model, ids, mask, capture_layers=layers, token_stats=False, stop_early=False)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(only.attn, full.attn) and torch.equal(whole.attn, full.attn)
    assert only.layers == full.layers and only.logprobs is None and only.entropy is None
    assert ran == list(range(max(full.layers) + 1))  # no layer above the last captured one started
    assert calls == list(range(model.config.num_hidden_layers))


def test_map_only_through_a_lora_wrapper():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = _batch()
    full = teacher_forced_pass(model, ids, mask, capture_layers="middle")
    only = teacher_forced_pass(model, ids, mask, capture_layers="middle", token_stats=False)
    assert torch.equal(only.attn, full.attn)


def test_map_only_needs_layers_and_no_grad():
    ids, mask = _batch()
    with pytest.raises(ValueError, match="capture_layers"):
        teacher_forced_pass(tiny_model("llama"), ids, mask, capture_layers=None, token_stats=False)
    with pytest.raises(ValueError, match="with_grad=False"):
        teacher_forced_pass(tiny_model("llama"), ids, mask, with_grad=True, token_stats=False)


@pytest.mark.parametrize("chunk_bytes", [None, 4096], ids=["one_chunk", "checkpointed_chunks"])
def test_entropy_grad_keeps_the_entropies_graph_and_their_values(chunk_bytes):
    """entropy_grad=True (an entropy bonus): the same entropies, now differentiable, with the gradient of
    a plain full-vocabulary reference, also when the projection runs in recomputed chunks."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids, mask = _batch()
    plain = teacher_forced_pass(model, ids, mask, capture_layers=None, with_grad=True, temperature=0.7,
                                logits_chunk_bytes=chunk_bytes)
    assert not plain.entropy.requires_grad
    out = teacher_forced_pass(model, ids, mask, capture_layers=None, with_grad=True, temperature=0.7,
                              logits_chunk_bytes=chunk_bytes, entropy_grad=True)
    torch.testing.assert_close(out.entropy.detach(), plain.entropy, atol=1e-5, rtol=1e-5)
    out.entropy.sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / 0.7, -1)
    ent = -(logp.exp() * logp).sum(-1)[:, :-1]  # position t-1 predicts token t
    valid = (mask[:, 1:] & mask[:, :-1]).bool()
    ent[valid].sum().backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == ref.keys() and ours
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], atol=1e-4, rtol=1e-3, msg=n)


def _grouped_batch():
    """Two prompts x three completions, TRL's layout: prompts left-padded, completions right-padded."""
    g = torch.Generator().manual_seed(1)
    B, P, C = 6, 10, 8
    ids = torch.randint(3, 100, (B, P + C), generator=g)
    ids[:3, :P], ids[3:, :P] = ids[0, :P], ids[3, :P]
    mask = torch.ones(B, P + C, dtype=torch.long)
    mask[3:, :2] = 0  # the second prompt is shorter
    mask[1, -3:], mask[4, -5:], mask[5, -1:] = 0, 0, 0
    ids[5, P:P + 2] = ids[4, P:P + 2]  # two completions that start alike share that too
    return ids.masked_fill(mask == 0, 0), mask


def _spy_packs(monkeypatch) -> list:
    packs = []
    real = prefix.pack_inputs

    def spy(pack, device):
        packs.append(pack)
        return real(pack, device)

    monkeypatch.setattr(prefix, "pack_inputs", spy)
    return packs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("heads", ["mean", "max"])
def test_a_prompts_rows_run_it_once_and_give_the_padded_pass_map(arch, heads, monkeypatch):
    model = tiny_model(arch)
    ids, mask = _grouped_batch()
    full = teacher_forced_pass(model, ids, mask, capture_layers="middle", capture_heads=heads, share_prefix=False)
    padded = teacher_forced_pass(model, ids, mask, capture_layers="middle", capture_heads=heads, token_stats=False,
                                 share_prefix=False)
    packs = _spy_packs(monkeypatch)
    seen: list[tuple[int, ...]] = []
    embed = model.get_input_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(tuple(a[0].shape)))
    try:
        packed = teacher_forced_pass(model, ids, mask, capture_layers="middle", capture_heads=heads,
                                     token_stats=False)
    finally:
        embed.remove()
    assert [p.rows for p in packs] == [[0, 1, 2], [3, 4, 5]] and [p.prefix for p in packs] == [10, 8]
    assert seen == [(1, 10 + 8 + 5 + 8), (1, 8 + 8 + 3 + 7)]  # each prompt once, each completion's own tokens
    assert torch.equal(padded.attn, full.attn)
    torch.testing.assert_close(packed.attn, full.attn, atol=1e-6, rtol=0)
    assert (packed.attn[mask == 0] == 0).all() and (packed.attn.transpose(1, 2)[mask == 0] == 0).all()
    assert packed.layers == full.layers and packed.attn_seconds > 0


def test_the_pass_stops_at_the_attention_of_the_last_captured_layer():
    model = tiny_model("llama")
    ids, mask = _grouped_batch()
    layers, mlps = model.model.layers, []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_a, i=i: mlps.append(i)) for i, layer in enumerate(layers)]
    try:
        teacher_forced_pass(model, ids, mask, capture_layers=[1, 3], token_stats=False)
    finally:
        for h in hooks:
            h.remove()
    assert mlps == [0, 1, 2] * 2  # one forward per prompt; each ran layer 3's attention (captured), not its MLP


def test_no_packing_where_one_mask_does_not_fit_every_layer_or_rows_share_little(monkeypatch):
    packs = _spy_packs(monkeypatch)
    ids, mask = _grouped_batch()
    model = tiny_model("mistral")  # sliding-window layers: the window is the model's to apply
    assert not prefix.packable(model)
    out = teacher_forced_pass(model, ids, mask, capture_layers="middle", token_stats=False)
    assert torch.equal(out.attn, teacher_forced_pass(model, ids, mask, capture_layers="middle").attn)
    llama = tiny_model("llama")
    assert prefix.packable(llama)
    g = torch.Generator().manual_seed(2)
    distinct = torch.randint(3, 100, ids.shape, generator=g)  # no two rows share a first token
    distinct[:, 0] = torch.arange(3, 3 + len(distinct))
    assert prefix.plan_packs(distinct, mask, (mask.cumsum(-1) - 1).clamp(min=0)) is None
    teacher_forced_pass(llama, distinct.masked_fill(mask == 0, 0), mask, capture_layers="middle", token_stats=False)
    assert packs == []


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "eager")])
def test_packed_loss_forward_matches_each_row_run_alone(arch, attn, monkeypatch):
    """With a graph: a prompt run once for its rows gives each row's log-probs, entropies (with their
    graph) and gradients of a plain forward of that row alone, unpadded (the brute-force reference)."""
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model(arch, attn_implementation=attn), lora)
    ids, mask = _grouped_batch()
    response = torch.zeros_like(mask)
    response[:, 10:] = 1
    coef = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    packs = _spy_packs(monkeypatch)
    out = teacher_forced_pass(model, ids, mask, capture_layers="middle", with_grad=True, stats_mask=response,
                              temperature=0.7, entropy_grad=True)
    assert [p.rows for p in packs] == [[0, 1, 2], [3, 4, 5]]
    ((out.logprobs + 0.1 * out.entropy) * coef).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for b in range(len(ids)):
        real = mask[b].bool()
        row, wanted = ids[b, real], (response[b, real] == 1)[1:]
        logp = torch.log_softmax(model(input_ids=row[None]).logits[0, :-1].float() / 0.7, -1)
        lp = logp.gather(-1, row[1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(out.logprobs[b, real][1:][wanted], lp[wanted].detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out.entropy[b, real][1:][wanted], ent[wanted].detach(), atol=2e-5, rtol=1e-5)
        total = total + ((lp + 0.1 * ent)[wanted] * coef[b, real][1:][wanted]).sum()
    total.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == ref.keys() and any("lora" in n for n in ref)
    assert all(ref[n].abs().max() > 1e-3 for n in ref if "lora" in n)  # every adapter gets a real gradient
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], atol=1e-4, rtol=1e-3, msg=n)
    assert (out.logprobs[response == 0] == 0).all() and (out.logprobs[(response == 1) & (mask == 1)] != 0).all()


def test_the_start_up_line_says_whether_prompts_are_shared():
    assert "runs once" in prefix.forward_line(tiny_model("llama"), True) and "25% of the tokens" in prefix.forward_line(
        tiny_model("llama"), True)
    assert "model.share_prefix: false" in prefix.forward_line(tiny_model("llama"), False)
    assert "sliding-window" in prefix.forward_line(tiny_model("mistral"), True)
    flash = tiny_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert "takes 2-D masks only" in prefix.forward_line(flash, True)


def test_packs_hold_each_rows_real_tokens_against_a_brute_force_reading():
    """plan_packs / pack_inputs on random groups with left and right padding and holes: every pack's
    prefix is its rows' longest common (id, position) prefix, and its row indices read back each row's
    real tokens in order."""
    g = torch.Generator().manual_seed(4)
    shared = 0
    for _ in range(20):
        ids = torch.randint(3, 9, (6, 14), generator=g)  # a small vocabulary: completions often start alike
        ids[:3, :6], ids[3:, :6] = ids[0, :6], ids[3, :6]
        mask = (torch.rand(6, 14, generator=g) > 0.15).long()
        mask[:3, :6], mask[3:, :6] = mask[0, :6], mask[3, :6]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        packs = prefix.plan_packs(ids, mask, pos)
        if packs is None:
            continue
        real = [[(int(i), int(p)) for i, p, v in zip(ids[b], pos[b], mask[b]) if v] for b in range(6)]
        for pack in packs:
            seqs = [real[b] for b in pack.rows]
            common = next((n for n in range(min(map(len, seqs))) if len({s[n] for s in seqs}) > 1), min(map(len, seqs)))
            shared += len(pack.rows) > 1
            assert pack.prefix == common and pack.rows == list(range(pack.rows[0], pack.rows[-1] + 1))
            p_ids, _, p_pos, index = prefix.pack_inputs(pack, "cpu")
            for b, idx in zip(pack.rows, index):
                assert list(zip(p_ids[0, idx].tolist(), p_pos[0, idx].tolist())) == real[b]
    assert shared >= 10  # the draws did pack rows together
