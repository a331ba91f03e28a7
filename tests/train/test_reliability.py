"""Crash safety and numerical guards: SIGKILL + resume equals an uninterrupted run; NaN never saved."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, read_metrics, write_config

from flowtracer.cli import main
from flowtracer.runs.checkpoints import AtomicCheckpointIO, rewind_run_dir
from flowtracer.runs.csvlog import CSVLogger, print_and_write


def _with_callbacks(cfg, callbacks):
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["callbacks"] = callbacks
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_non_finite_values_skip_the_update_and_are_counted(tmp_path, tiny_model_dir):
    faults = ["rewards", "advantages", "token_weights", "grad"]
    cfg = _with_callbacks(write_config(tmp_path, tiny_model_dir, steps=2),
                          [{"class_path": "faults.InjectFaults", "init_args": {"faults": faults}}])
    main(["fit", "--config", str(cfg), "--model.val_before_training", "false", "--trainer.val_check_interval", "100"])
    run = tmp_path / "logs" / "tiny" / "version_0"
    m = read_metrics(run)
    # max_steps counts applied optimizer steps: 4 skipped RL steps, then 2 good ones
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    assert [m[s]["guard/skipped_updates"] for s in m] == [1, 1, 1, 1, 0, 0]
    assert [m[s]["guard/skipped_total"] for s in m] == [1, 2, 3, 4, 4, 4]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["flowtracer"]["rl_step"] == 6 and ckpt["flowtracer"]["skips"]["total"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_consecutive_skips_stop_the_run_with_a_clear_message(tmp_path, tiny_model_dir, capsys):
    cfg = _with_callbacks(write_config(tmp_path, tiny_model_dir, steps=3),
                          [{"class_path": "faults.InjectFaults", "init_args": {"faults": ["grad"] * 10}}])
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(cfg), "--model.val_before_training", "false",
              "--model.optim.max_consecutive_skips", "3"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flowtracer: error: 3 updates in a row were skipped") and "model.optim.lr" in err
    assert not (tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_a_checkpoint_interrupted_mid_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_csv_logger_keeps_rows_on_new_columns_and_on_reopen(tmp_path):
    log = CSVLogger(tmp_path, name="x", version=0)
    log.log_metrics({"a": 1.0}, step=0)
    log.log_metrics({"a": 2.0, "b": 3.0}, step=1)  # new column: atomic rewrite
    log2 = CSVLogger(tmp_path, name="x", version=0)  # a resumed run reopens the folder
    log2.log_metrics({"a": 4.0, "b": 5.0}, step=2)
    rows = list(csv.DictReader(open(tmp_path / "x" / "version_0" / "metrics.csv")))
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("0", "1.0", ""), ("1", "2.0", "3.0"), ("2", "4.0", "5.0")]
    # rewind drops the rows of steps to redo and a torn last line
    with open(tmp_path / "x" / "version_0" / "metrics.csv", "a") as f:
        f.write("3,9.0")
    rewind_run_dir(str(tmp_path / "x" / "version_0"), steps_done=2)
    rows = list(csv.DictReader(open(tmp_path / "x" / "version_0" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "1"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _steps_logged(run) -> int:
    path = run / "rollouts.jsonl"
    if not path.exists():
        return 0
    return len({json.loads(line)["step"] for line in open(path) if line.endswith("\n")})


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_logs_the_uninterrupted_metrics(tmp_path, tiny_model_dir):
    steps = 5
    full = write_config(tmp_path / "full", tiny_model_dir, steps=steps, verifier="toy_rewards:digits")
    main(["fit", "--config", str(full)])
    expected = read_metrics(tmp_path / "full" / "logs" / "tiny" / "version_0")
    assert all(row["adv/zero_variance_groups"] < 2 for row in expected.values())  # every step is a real update
    expected_rollouts = open(tmp_path / "full" / "logs" / "tiny" / "version_0" / "rollouts.jsonl").readlines()

    seed = int(os.environ.get("FLOWTRACER_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kill_after = rng.randint(2, steps - 2)  # steps fully logged before the kill window opens
    delay_frac = rng.uniform(0.0, 1.0)  # then this far into the next step (or its checkpoint write)
    cfg = write_config(tmp_path / "part", tiny_model_dir, steps=steps, verifier="toy_rewards:digits")
    run = tmp_path / "part" / "logs" / "tiny" / "version_0"
    proc = subprocess.Popen([sys.executable, "-m", "flowtracer.cli", "fit", "--config", str(cfg)],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        seen = {0: time.time()}  # steps logged -> when first seen, to size the kill window
        while max(seen) < kill_after and proc.poll() is None and time.time() < deadline:
            seen.setdefault(_steps_logged(run), time.time())
            time.sleep(0.02)
        last = max(seen)  # step 1's interval would include start-up, hence kill_after >= 2
        step_seconds = seen[last] - seen.get(last - 1, seen[last])
        time.sleep(delay_frac * step_seconds)  # a step lasts about as long as the last one did
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed})"
    ckpt = run / "checkpoints" / "last.ckpt"
    at_kill = torch.load(ckpt, weights_only=True)["state_dict"] if ckpt.exists() else None
    # the resume is a fresh Trainer from what is on disk; in this process it saves ~10 s of imports
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0, f"seed {seed}"
    got = read_metrics(run)
    assert sorted(got) == sorted(expected), f"seed {seed}"
    for step, row in expected.items():
        for key, value in row.items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (seed, step, key)
    final = torch.load(ckpt, weights_only=True)["state_dict"]
    expected_state = torch.load(tmp_path / "full" / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt",
                                weights_only=True)["state_dict"]
    for k in expected_state:  # the adapters and (through them) the optimizer state were restored
        torch.testing.assert_close(final[k], expected_state[k], atol=1e-6, rtol=1e-5, msg=f"{k} seed {seed}")
    if at_kill is not None:  # the steps after the resume moved the weights on from the checkpoint
        assert any(not torch.equal(final[k], at_kill[k]) for k in final), seed
    lines = open(run / "rollouts.jsonl").readlines()
    assert len(lines) == len(expected_rollouts)  # no record lost, none duplicated, none torn
    for a, b in zip(lines, expected_rollouts):
        ra, rb = json.loads(a), json.loads(b)
        assert (ra["step"], ra["response"], ra["reward"]) == (rb["step"], rb["response"], rb["reward"]), seed


def test_a_results_table_is_printed_and_written_whole(tmp_path, capsys):
    out = tmp_path / "table.md"
    out.write_text("an older table that is longer than the new one\n")
    text = print_and_write(["# title", "", "| a |"], str(out))
    assert text == "# title\n\n| a |\n" and out.read_text() == text
    assert capsys.readouterr().out == f"{text}\nwrote {out}\n"
    assert print_and_write(["x"], None) == "x\n" and not list(tmp_path.glob("*.tmp-*"))
