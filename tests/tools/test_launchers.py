"""The same 2x2 grid of tiny `fit` cells through every launcher, with no GPU and no cluster:
`--launcher local` on four fake GPUs (two cells of two at once, disjoint devices); a real local Ray
cluster with four fake GPUs (one cell per GPU, a worker killed mid-run and the cell retried, the
summaries sent back from a worker disk that is not the grid's); submitit's local executor through
the Slurm launcher (and its resume). Each report must equal the local one: same seeds, same metrics."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from grids import write_grid

from flowtracer.cli import main
from flowtracer.tools.grid import load_grid, run_grid

# One xdist group: the session's reference grid and the module's Ray cluster are built once, on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launchers")]

ENV = {"OMP_NUM_THREADS": 1}
METRICS = ("cell", "state", "steps", "init_val", "final_val", "best_val", "auc_val", "mean_reward")


def _metrics(out: Path) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in csv.DictReader(open(out / "summary.csv"))]


def _report_tables(out: Path) -> list[list[str]]:
    """report.md's group and paired-difference rows without the timing columns (they differ by run)."""
    md = (out / "report.md").read_text().split("## Cells")[0]
    return [line.split("|")[1:7] for line in md.splitlines() if line.startswith("| arm=")]


def _dones(out: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "done.json").read_text()) for d in sorted((out / "cells").iterdir())}


def _same_report(out: Path, ref: Path) -> None:
    assert _metrics(out) == _metrics(ref)
    assert all(r["state"] == "done" and r["final_val"] not in ("", "nan") for r in _metrics(out))
    assert _report_tables(out) == _report_tables(ref) and len(_report_tables(ref)) == 4  # 2 groups + 2 paired


@pytest.fixture
def local_ref(reference_grid) -> Path:
    """The reference: --launcher local, 2 cells at a time, 2 of 4 fake GPUs each (conftest.py: reference_grid)."""
    return reference_grid.parent / "local"


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def test_local_cells_get_disjoint_devices(local_ref):
    dones = _dones(local_ref)
    assert {d["devices"] for d in dones.values()} == {"0,1", "2,3"}
    spans = {n: (json.loads((local_ref / "cells" / n / "where.json").read_text())["started"], d)
             for n, d in dones.items()}
    overlapping = [(a, b) for a in spans for b in spans if a < b
                   and spans[a][0] < spans[b][0] + spans[b][1]["seconds"]
                   and spans[b][0] < spans[a][0] + spans[a][1]["seconds"]]
    assert overlapping, "no two cells ran at once: the assignment was not exercised"
    for a, b in overlapping:
        assert spans[a][1]["devices"] != spans[b][1]["devices"], (a, b)


def test_slurm_launcher_on_submitits_local_executor(local_ref, tmp_path, tiny_model_dir):
    cfg = write_grid(tmp_path, tiny_model_dir, name="slurm", env=ENV, launcher="slurm",
                     slurm={"cluster": "local", "time": 30})
    assert main(["grid", "--config", str(cfg), "--no-live"]) == 0
    out = tmp_path / "slurm"
    ids = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(ids) == sorted(_dones(out)) and len(set(ids.values())) == 4  # one job per cell
    assert all(d["launcher"] == "slurm" for d in _dones(out).values())
    _same_report(out, local_ref)

    # The grid was stopped after a job finished but before it took the result: a rerun takes the
    # job's result instead of running the cell again, and skips the cells it had finished.
    cell = out / "cells" / "arm=uniform,seed=1"
    (cell / "done.json").unlink()
    stamps = {c.name: (c / "run/version_0/metrics.csv").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    assert main(["grid", "--config", str(cfg), "--no-live"]) == 0
    assert (cell / "done.json").exists()
    assert {c.name: (c / "run/version_0/metrics.csv").stat().st_mtime_ns for c in (out / "cells").iterdir()} == stamps
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == ids  # nothing was submitted again
    _same_report(out, local_ref)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie waits for its reaper but runs nothing


def _wait_for(cond, what: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_ray_grid_retries_a_killed_worker_and_reports_like_local(ray_cluster, local_ref, tmp_path, tiny_model_dir):
    node = tmp_path / "node"  # the workers' disk: not the grid folder, as on a cluster without shared storage
    cfg = write_grid(tmp_path, tiny_model_dir, name="ray", env=ENV, launcher="ray", gpus_per_cell=1,
                     max_retries=2, worker_out=str(node))
    codes = []
    grid = threading.Thread(target=lambda: codes.append(main(["grid", "--config", str(cfg), "--no-live"])))
    grid.start()
    victim = node / "cells" / "arm=random,seed=1"
    # Killed as soon as where.json exists: the board has counted the attempt before it is written, so the
    # retry's `attempts` is 2 however early the worker dies.
    _wait_for(lambda: (victim / "where.json").exists() or not grid.is_alive(), "the victim's where.json")
    assert grid.is_alive(), "the grid ended before the kill"
    where = json.loads((victim / "where.json").read_text())
    assert _alive(where["fit_pid"]), "the victim's fit ended before the kill"
    os.kill(where["pid"], signal.SIGKILL)  # its Ray worker, as when a node dies
    _wait_for(lambda: not _alive(where["fit_pid"]), "the orphaned fit to die with its worker", 30)
    grid.join(600)
    assert codes == [0]

    out = tmp_path / "ray"
    dones = _dones(out)
    assert {n: d["attempts"] for n, d in dones.items()} == {
        "arm=random,seed=0": 1, "arm=random,seed=1": 2, "arm=uniform,seed=0": 1, "arm=uniform,seed=1": 1}
    # one fake GPU each; the cells that ran once ran at the same time, so theirs are distinct. The
    # retried cell's second attempt may get a GPU a finished cell has freed (Ray reuses free ids).
    once = [d["devices"] for d in dones.values() if d["attempts"] == 1]
    assert len(set(once)) == len(once) == 3
    assert {d["devices"] for d in dones.values()} <= {"0", "1", "2", "3"}
    assert all(d["launcher"] == "ray" for d in dones.values())
    for name in dones:  # the run folders stayed on the workers' disk; the summaries came back
        assert not (out / "cells" / name / "run").exists() and (out / "cells" / name / "summary.csv").exists()
        assert (node / "cells" / name / "run" / "version_0" / "metrics.csv").exists()
    _same_report(out, local_ref)


def test_ray_cell_that_fails_on_its_own_is_not_retried(ray_cluster, tmp_path, tiny_model_dir):
    cfg = write_grid(tmp_path, tiny_model_dir, name="bad", env=ENV, launcher="ray", max_retries=2,
                     worker_out=str(tmp_path / "node"))
    spec = {**__import__("yaml").safe_load(cfg.read_text()), "axes": {"seed": [0]}}
    spec["overrides"]["model.model"] = str(tmp_path / "no_such_model")
    cfg.write_text(__import__("yaml").safe_dump(spec))
    (cell,) = run_grid(load_grid(cfg), live=False, poll_s=0.2)
    assert cell.state == "failed" and cell.attempts == 1 and cell.error == "fit exited with 2"
    assert not cell.done_file.exists()
    assert "no_such_model" in (cell.dir / "fit.log").read_text()  # the log's end came back from the worker


def test_ray_cluster_without_the_resources_is_one_line(ray_cluster, tmp_path, capsys):
    cfg = write_grid(tmp_path, "unused", launcher="ray", gpus_per_cell=5)
    with pytest.raises(SystemExit) as exit_:
        main(["grid", "--config", str(cfg), "--no-live"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert "needs 5 GPU and 1 CPU, and the Ray cluster has 4 GPU" in err


@pytest.mark.parametrize("launcher,extra", [("ray", "ray"), ("slurm", "slurm")])
def test_launcher_without_its_engine_is_one_line(launcher, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray" if launcher == "ray" else "submitit", None)  # not installed
    cfg = write_grid(tmp_path, "unused")
    with pytest.raises(SystemExit) as exit_:
        main(["grid", "--config", str(cfg), "--launcher", launcher, "--no-live"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert f"--launcher {launcher} needs" in err and f"pip install 'flowtracer[{extra}]'" in err
    assert not (tmp_path / "grid").exists()  # nothing written


def test_a_board_that_does_not_answer_comes_back_in_the_cells_payload(ray_cluster, monkeypatch):
    """Ray workers' stderr does not reach the grid, so an unanswered board report travels in the payload."""
    import flowtracer.tools.cells as cells
    from flowtracer.tools.launchers import CellBoard, _tell_board

    board = ray.remote(CellBoard).remote()
    assert _tell_board(board, "arm=a", {"node": "n"}) is True
    assert ray.get(board.snapshot.remote())["arm=a"]["attempt"] == 1
    ray.kill(board)
    # the kill is asynchronous: a call sent right after it may still be answered, so wait for the death
    for _ in range(100):
        try:
            ray.get(board.snapshot.remote(), timeout=5)
        except ray.exceptions.RayError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the killed board kept answering for 10 s")
    assert _tell_board(board, "arm=a", {"node": "n"}, timeout_s=5) is False

    class Done:
        def wait(self):
            return 0

    def fake_start(spec, report=None):
        if report is not None:
            report(spec["name"], {"node": "n"})
        return Done()

    monkeypatch.setattr(cells, "start_fit", fake_start)
    monkeypatch.setattr(cells, "finish_fit", lambda spec, rc, seconds: {"rc": rc})
    for answered in (True, False):
        out = cells.run_cell({"name": "arm=a"}, report=lambda name, where, a=answered: a)
        assert out == {"rc": 0, "board_answered": answered}
    assert "board_answered" not in cells.run_cell({"name": "arm=a"})  # Slurm: no board
