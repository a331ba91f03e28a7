"""`flowtracer sft` on a tiny random model: response-only labels, learning, resume, export -> fit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from tiny import tiny_model, tiny_tokenizer

from flowtracer.cli import main
from flowtracer.data.sources import load_rows
from flowtracer.model.policy import load_policy
from flowtracer.train.sft import build_batch, response_loss


def sft_config(tmp_path: Path, model_dir: str, *, steps: int, lora=None, every: int = 2, **model) -> Path:
    cfg = yaml.safe_load(open(ROOT / "experiments/sft/chains.yaml"))
    cfg["trainer"].update(max_steps=steps, val_check_interval=steps, limit_val_batches=1, enable_model_summary=False)
    cfg["trainer"]["logger"][0]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["checkpoint"]["every_n_train_steps"] = every
    # constant lr (min_lr_ratio 1): a run cut short by a smaller max_steps then matches an uninterrupted one
    cfg["model"].update(model=model_dir, lora=lora, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
                        export_dir=str(tmp_path / "export"),
                        **model)
    cfg["data"].update(batch_size=4, max_length=512, val_size=4)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> list[float]:
    return [float(r["train/loss"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]


def weights(folder) -> dict[str, torch.Tensor]:
    model, _ = load_policy(str(folder), lora=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_labels_cover_response_tokens_only():
    tok = tiny_tokenizer()
    prompts, responses = ["<|im_start|>user\nhi<|im_end|>\n", "a longer prompt here: "], ["c = 1 + 2 = 3", "ok"]
    b = build_batch(tok, prompts, responses, max_length=200)
    labelled = b["labels"] != -100
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = b["input_ids"][i][labelled[i]].tolist()
        assert ids == tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert (b["labels"][i][labelled[i]] == b["input_ids"][i][labelled[i]]).all()
        prompt_cols = b["attention_mask"][i].bool() & ~labelled[i]
        assert tok.decode(b["input_ids"][i][prompt_cols]) == p  # every other real token is prompt
    assert not labelled[:, : b["prompt_len"]].any()
    # a response that does not fit is cut (and then has no eos)
    n_prompt = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    cut = build_batch(tok, prompts[:1], ["x" * 50], max_length=n_prompt + 10)
    assert (cut["labels"] != -100).sum() == 10 and tok.eos_token_id not in cut["labels"][0].tolist()


def test_loss_ignores_prompt_tokens():
    """Changing prompt labels' targets cannot change the loss; changing a response token does."""
    tok, model = tiny_tokenizer(), tiny_model("llama")
    b = build_batch(tok, ["What is 1 + 1?\n"], ["1 + 1 = 2"], 100)
    base, n = response_loss(model, b)
    assert n == len("1 + 1 = 2") + 1
    logits = model(input_ids=b["input_ids"]).logits[0, :-1]
    targets = b["labels"][0, 1:]
    keep = targets != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(base, ref, rtol=1e-5, atol=1e-6)  # logits_to_keep path = full-logits path


@pytest.mark.slow
def test_sft_learns_resumes_and_exports(tmp_path, tiny_model_dir):
    straight = sft_config(tmp_path / "a", tiny_model_dir, steps=6)
    main(["sft", "--config", str(straight)])
    run = tmp_path / "a/logs/sft_chains/version_0"
    ls = losses(run)
    assert len(ls) == 6 and ls[-1] < ls[0] - 0.1  # it learns
    w0, w_a = weights(tiny_model_dir), weights(tmp_path / "a/export")
    assert any(not torch.equal(w0[k], w_a[k]) for k in w0)  # the exported weights moved
    # interrupted after 4 steps, then resumed to 6: same weights as the straight run
    part = sft_config(tmp_path / "b", tiny_model_dir, steps=4)
    main(["sft", "--config", str(part)])
    full = sft_config(tmp_path / "b", tiny_model_dir, steps=6)
    main(["sft", "--config", str(full), "--ckpt_path", "last"])
    w_b = weights(tmp_path / "b/export")
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "b/logs/sft_chains/version_0") == pytest.approx(ls, rel=1e-5)


def test_fused_and_multi_tensor_adamw_make_the_same_update(tmp_path, tiny_model_dir):
    """fused_adamw (the config's default) is a faster kernel for the same AdamW: equal weights."""
    for name, fused in (("fused", True), ("foreach", False)):
        main(["sft", "--config", str(sft_config(tmp_path / name, tiny_model_dir, steps=3, fused_adamw=fused))])
    w0, w_f, w_m = weights(tiny_model_dir), weights(tmp_path / "fused/export"), weights(tmp_path / "foreach/export")
    assert any(not torch.equal(w0[k], w_f[k]) for k in w0)  # the update moved the weights
    for k in w_f:
        torch.testing.assert_close(w_f[k], w_m[k], rtol=1e-4, atol=1e-5)


def test_lora_sft_adapter_and_merged_folder_start_fit(tmp_path, tiny_model_dir):
    cfg = sft_config(tmp_path, tiny_model_dir, steps=3, lora={"r": 4, "alpha": 8})
    main(["sft", "--config", str(cfg)])
    export = tmp_path / "export"
    assert (export / "config.json").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    merged, tok = load_policy(str(export), lora=None)
    from_adapter, _ = load_policy(str(export / "adapter"), lora=None)
    base, _ = load_policy(tiny_model_dir, lora=None)
    rows = load_rows("data/chains_val.jsonl")[:2]
    b = build_batch(tok, [r["question"] for r in rows], [r["meta"]["solution"] for r in rows], 512)
    with torch.no_grad():
        out = [response_loss(m.eval(), b)[0] for m in (merged, from_adapter, base)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)  # adapter folder = merged folder
    assert abs(float(out[0] - out[2])) > 1e-4  # and both differ from the base model
    # RL starts from the merged folder (LoRA on top of it)
    from conftest import write_config

    fit_cfg = write_config(tmp_path / "fit", str(export), steps=1)
    main(["fit", "--config", str(fit_cfg), "--trainer.val_check_interval", "1"])
    assert (tmp_path / "fit/logs/tiny/version_0/checkpoints/last.ckpt").is_file()


def test_sft_missing_target_field_is_one_clear_error(tmp_path, tiny_model_dir, capsys):
    cfg = sft_config(tmp_path, tiny_model_dir, steps=1)
    with pytest.raises(SystemExit) as err:
        main(["sft", "--config", str(cfg), "--data.target_field", "nope"])
    assert err.value.code == 2
    assert "data.target_field" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()




def test_sft_in_bf16_mixed_learns_with_finite_losses(tmp_path, tiny_model_dir):
    """`trainer.precision: bf16-mixed` (CPU autocast): the cross-entropy is taken on float32 logits,
    the loss falls, the exported float32 weights moved and are finite."""
    cfg = sft_config(tmp_path, tiny_model_dir, steps=4)
    main(["sft", "--config", str(cfg), "--trainer.precision", "bf16-mixed"])
    ls = losses(tmp_path / "logs/sft_chains/version_0")
    assert len(ls) == 4 and all(map(math.isfinite, ls)) and ls[-1] < ls[0]
    w0, w1 = weights(tiny_model_dir), weights(tmp_path / "export")
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in w1.values())
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
