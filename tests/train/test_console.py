"""The first screen of a fit (flowtracer.train.console): named warning filters that drop exactly the
warnings a user cannot act on, and a progress bar in steps of max_steps that counts on after a resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import yaml
from conftest import ROOT, write_config

from flowtracer.train.console import QUIET_WARNINGS, quiet_warnings, step_text

# one message each filter is meant for, as its source writes it, and the module it comes from
SAMPLES = {
    "lightningcli-args": ("LightningCLI's args parameter is intended to run from within Python like if it were "
                          "from the command line.", UserWarning, "lightning.pytorch.cli"),
    "torch-pytree-leafspec": ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) "
                              "and treespec.is_leaf()` instead.", FutureWarning, "lightning.pytorch.utilities._pytree"),
    "transformers-is-gradient-checkpointing": ("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                                               FutureWarning, "transformers.modeling_utils"),
    "manual-optimization-checkpoint": ("When using ModelCheckpoint with manual optimization and every_n_train_steps",
                                       UserWarning, "lightning.pytorch.callbacks.model_checkpoint"),
    "dataloader-not-resumable": ("The dataloader, train_dataloader, does not have many workers; your dataloader is "
                                 "not resumable.", UserWarning, "lightning.pytorch.loops.training_epoch_loop"),
}


def shown(message: str, category, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return bool(caught)


def test_each_named_filter_drops_its_message_and_nothing_else():
    assert set(SAMPLES) == set(QUIET_WARNINGS)
    for name, (message, category, module) in SAMPLES.items():
        assert not shown(message, category, module), name
    # the same modules' other warnings, and ours, still show
    assert shown("The number of training batches (2) is smaller than the logging interval", UserWarning,
                 "lightning.pytorch.loops.fit_loop")
    assert shown("`use_cache=True` is incompatible with gradient checkpointing", UserWarning,
                 "transformers.modeling_utils")
    assert shown("FlowTracer: 80% of a batch's responses got uniform weights", UserWarning,
                 "flowtracer.integrations.trl")
    # the pytree deprecation from anywhere but Lightning's helper is not ours to hide
    assert shown(SAMPLES["torch-pytree-leafspec"][0], FutureWarning, "mypackage.trees")


def test_step_text_counts_steps_and_time_left_and_resumes():
    assert step_text(0, 12, 0, 0.0) == ("0/12", "-- s/step")
    assert step_text(3, 12, 0, 30.0) == ("3/12", "10.0 s/step, 1:30 left")
    assert step_text(3, 4, 2, 5.0) == ("3/4", "5.0 s/step, 0:05 left")  # resumed at 2: one step in 5 s
    assert step_text(2, 4, 2, 0.0) == ("2/4", "-- s/step")  # just resumed: nothing measured yet
    assert step_text(100, 500, 0, 4000.0) == ("100/500", "40.0 s/step, 4:26:40 left")
    assert step_text(5, None, 0, 10.0) == ("5", "2.0 s/step")  # no max_steps


def run_fit(cfg, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "160"}
    res = subprocess.run([sys.executable, "-m", "flowtracer.cli", "fit", "--config", str(cfg), *extra], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout, res.stderr


def test_a_fit_shows_steps_of_max_steps_and_no_unactionable_warning(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=2)
    data = yaml.safe_load(cfg.read_text())
    del data["trainer"]["enable_model_summary"]  # the CLI's own default
    data["trainer"]["log_every_n_steps"] = 50  # Lightning warns about it: a warning a user can act on
    cfg.write_text(yaml.safe_dump(data))
    out, err = run_fit(cfg)
    for name, (message, _, _, _) in QUIET_WARNINGS.items():
        assert not re.search(message, err), name
    assert "Tip:" not in err and "Total FLOPs" not in out and "Modules in train mode" not in out
    assert "smaller than the logging interval" in err  # actionable: still shown
    assert "[flowtracer] model: 67.7 K parameters" in err
    assert re.search(r"train .* 2/2 \d+\.\d s/step, 0:00 left", out), out
    assert "Epoch" not in out and "it/s" not in out and "v_num" not in out
    # a resume counts on from the checkpoint's step, against the new max_steps
    ckpt = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    out, err = run_fit(cfg, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt))
    assert re.search(r"train .* 4/4 \d+\.\d s/step, 0:00 left", out), out
    assert not re.search(r"\b\d/[0-3]\b", out.replace("4/4", "")), out  # no "2/0", "3/1"
