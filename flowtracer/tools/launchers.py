"""Grid cells on a cluster: `--launcher ray` (Ray tasks) and `--launcher slurm` (submitit jobs).

Both run the same `flowtracer.tools.cells.run_cell` (a `fit` subprocess) and hand its payload to the
grid (`land`), which writes done.json, the per-cell summaries and, at the end, the report; neither
engine is imported unless its launcher runs (`pip install 'flowtracer[ray]'` / `'flowtracer[slurm]'`).

Ray: each cell is a task with `num_gpus=gpus_per_cell`, `num_cpus=cpus_per_cell`, so Ray's scheduler
places it on any node with free resources and sets its CUDA_VISIBLE_DEVICES. A task whose worker or
node dies is rerun by Ray (`max_retries`); a `fit` that fails returns its exit code and is not.
Where each cell runs (node, devices, attempt) reaches the live table through a small actor.

Slurm: the cells are one job array (submitit; `slurm:` keys of the grid file, e.g. partition, time,
mem_gb, array_parallelism), each job one cell. A job that ends without a result (node failure,
preemption, time limit, scancel) is resubmitted up to `max_retries` times; one whose `fit` failed is
not. The job ids are kept in <out>/slurm/jobs.json: a rerun of the grid while jobs still run follows
them instead of submitting the cells again, and takes the result of a job that finished meanwhile.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

from flowtracer.errors import InputError, UserError
from flowtracer.tools.cells import run_cell


def import_engine(launcher: str):
    try:
        if launcher == "ray":
            import ray  # optional: pip install 'flowtracer[ray]'

            return ray
        import submitit  # optional: pip install 'flowtracer[slurm]'

        return submitit
    except ImportError as err:
        pkg = "Ray" if launcher == "ray" else "submitit"
        extra = "ray" if launcher == "ray" else "slurm"
        raise UserError(f"--launcher {launcher} needs {pkg}: pip install 'flowtracer[{extra}]'") from err


class CellBoard:
    """Ray actor: where each cell runs now (node, devices, pids) and how many times it started."""

    def __init__(self):
        self.cells: dict[str, dict] = {}

    def report(self, name: str, where: dict) -> int:
        attempt = self.cells.get(name, {}).get("attempt", 0) + 1
        self.cells[name] = {**where, "attempt": attempt}
        return attempt

    def snapshot(self) -> dict[str, dict]:
        return self.cells


def _tell_board(board, name: str, where: dict, timeout_s: float = 30.0) -> bool:
    """Whether the board answered. Waits for it: a message only sent (fire and forget) is lost when the
    worker dies right after, and the retry then undercounts `attempts`. A lost or restarting board never
    fails a cell; the cell's payload says it went unanswered and the grid warns (a worker's stderr does
    not reach the driver)."""
    ray = import_engine("ray")
    try:
        ray.get(board.report.remote(name, where), timeout=timeout_s)
        return True
    except (ray.exceptions.RayError, TimeoutError):
        return False


def _fail(cell, reason: str) -> None:
    cell.state, cell.error = "failed", reason


def _check_ray_resources(ray, gpus: float, cpus: float) -> None:
    total = ray.cluster_resources()
    if gpus > total.get("GPU", 0) or cpus > total.get("CPU", 0):
        raise InputError(
            f"a cell needs {gpus:g} GPU and {cpus:g} CPU, and the Ray cluster has {total.get('GPU', 0):g} GPU and "
            f"{total.get('CPU', 0):g} CPU in all; lower gpus_per_cell/cpus_per_cell in the grid file or add a node "
            f"(ray start --address <head>:6379 --num-gpus N)")


def run_ray(grid, cells, spec, land, refresh, poll_s: float = 1.0) -> None:
    """Every cell of `cells` as a Ray task; `land(cell, payload)` as each one ends."""
    ray = import_engine("ray")
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(**{"log_to_driver": False, **grid.ray})
        except (TypeError, ConnectionError) as err:
            raise InputError(f"ray.init({grid.ray}): {err}; fix `ray:` in the grid file") from err
    gpus = grid.gpus_per_cell if grid.gpus_per_cell is not None else int(ray.cluster_resources().get("GPU", 0) > 0)
    _check_ray_resources(ray, gpus, grid.cpus_per_cell)
    # Restarted if its worker dies (e.g. Ray's memory monitor); a restart forgets what it was told.
    board = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(CellBoard).remote()
    task = ray.remote(run_cell)
    opts = {"num_gpus": gpus, "num_cpus": grid.cpus_per_cell, "max_retries": grid.max_retries,
            "retry_exceptions": False}  # a fit that fails returns its exit code; only a lost worker is retried
    tell = functools.partial(_tell_board, board)
    refs = {}
    for cell in cells:
        refs[task.options(name=f"grid:{cell.name}", **opts).remote(spec(cell), tell)] = cell
        cell.state, cell.queue = "queued", "submitted"
    refresh()
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=poll_s)
            try:
                where = ray.get(board.snapshot.remote(), timeout=60)
            except ray.exceptions.RayError as err:  # the board is restarting: no update this round
                print(f"flowtracer grid: warning: cell board unavailable ({type(err).__name__}); node, devices "
                      f"and attempts in the table and done.json may lag or undercount", file=sys.stderr)
                where = {}
            for cell in refs.values():
                if cell.name in where:
                    w = where[cell.name]
                    cell.node, cell.devices, cell.attempts = w["node"], w["devices"], w["attempt"]
                    if cell.state == "queued":
                        cell.state, cell.started, cell.queue = "running", time.time(), "running"
            for ref in ready:
                cell = refs.pop(ref)
                try:
                    payload = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # run_cell itself raised: not a lost worker
                    _fail(cell, f"the cell raised {str(err).strip().splitlines()[-1]}")
                    continue
                except ray.exceptions.RayError as err:  # its worker or node died more than max_retries times
                    _fail(cell, f"{type(err).__name__} after {cell.attempts} attempt(s)")
                    continue
                if payload.get("board_answered") is False:
                    print(f"flowtracer grid: warning: the cell board did not answer when {cell.name} started; "
                          f"its attempts ({cell.attempts}) may undercount", file=sys.stderr)
                land(cell, payload)
            refresh()
    finally:
        for ref in refs:  # interrupted: stop the cells still queued or running
            ray.cancel(ref, force=True)
        ray.kill(board)
        if started_here:  # a one-machine cluster of our own (or our connection to theirs)
            ray.shutdown()


def _executor(submitit, grid):
    params = dict(grid.slurm)
    executor = submitit.AutoExecutor(folder=grid.out / "slurm" / "%j", cluster=params.pop("cluster", None))
    # GPUs are requested from Slurm only: submitit's local and debug executors run on this machine
    gpus = grid.gpus_per_cell if grid.gpus_per_cell is not None else int(executor.cluster == "slurm")
    kw = {"name": f"grid-{grid.out.name}", "timeout_min": int(params.pop("time", 24 * 60)), "nodes": 1,
          "tasks_per_node": 1, "gpus_per_node": gpus, "cpus_per_task": math.ceil(grid.cpus_per_cell)}
    for key, value in params.items():  # Slurm options: partition, account, qos, array_parallelism, setup, ...
        kw[key if key in ("mem_gb", "stderr_to_stdout") else f"slurm_{key}"] = value
    try:
        executor.update_parameters(**kw)
    except (ValueError, TypeError, AssertionError) as err:  # submitit checks types with assert
        raise InputError(f"slurm: {str(err).splitlines()[0]}; fix `slurm:` in the grid file") from err
    return executor


def _job_class(submitit, executor):
    return {"slurm": submitit.SlurmJob, "local": submitit.LocalJob}.get(executor.cluster)


def _follow_or_submit(submitit, executor, todo, spec, ids: dict) -> dict:
    """job -> cell: jobs recorded by an earlier run (still running, or with a result) are followed;
    the other cells are submitted as one array."""
    jobs, fresh = {}, []
    job_class = _job_class(submitit, executor)
    for cell in todo:
        old = ids.get(cell.name)
        job = job_class(folder=executor.folder, job_id=old) if old and job_class else None
        if job is not None and (not job.done() or job.paths.result_pickle.exists()):
            jobs[job] = cell
        else:
            fresh.append(cell)
    if fresh:
        with executor.batch():
            submitted = [executor.submit(run_cell, spec(cell)) for cell in fresh]
        jobs.update(zip(submitted, fresh))
    for job, cell in jobs.items():
        ids[cell.name] = job.job_id
        cell.state, cell.attempts = "queued", cell.attempts + 1
    return jobs


def _where(cell, spec) -> None:
    path = Path(spec(cell)["dir"]) / "where.json"
    try:
        w = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    cell.node, cell.devices = w["node"], w["devices"]


def run_slurm(grid, cells, spec, land, refresh, poll_s: float = 1.0) -> None:
    """Every cell of `cells` as a Slurm job (submitit); `land(cell, payload)` as each one ends."""
    submitit = import_engine("slurm")
    executor = _executor(submitit, grid)
    ids_file = grid.out / "slurm" / "jobs.json"
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    jobs = _follow_or_submit(submitit, executor, cells, spec, ids)
    ids_file.write_text(json.dumps(ids, indent=1))
    refresh()
    try:
        while jobs:
            time.sleep(poll_s)
            again = []
            for job, cell in list(jobs.items()):
                cell.queue = job.state
                if cell.queue == "RUNNING" and cell.state == "queued":
                    cell.state, cell.started = "running", time.time()
                _where(cell, spec)
                if not job.done():
                    continue
                del jobs[job]
                try:
                    payload = job.result()
                except submitit.core.utils.FailedJobError as err:  # run_cell itself raised: not a lost node
                    _fail(cell, f"job {job.job_id} raised: {str(err).splitlines()[-1]}")
                except submitit.core.utils.UncompletedJobError:  # no result: node failure, preemption, time limit
                    if cell.attempts > grid.max_retries:
                        _fail(cell, f"job {job.job_id} ended without a result, {cell.attempts} attempt(s)")
                    else:
                        again.append(cell)
                else:
                    land(cell, payload)
            if again:
                jobs.update(_follow_or_submit(submitit, executor, again, spec, {}))
                ids.update({c.name: j.job_id for j, c in jobs.items()})
                ids_file.write_text(json.dumps(ids, indent=1))
            refresh()
    finally:
        for job in jobs:  # interrupted: cancel what is still queued or running (a rerun resubmits it)
            job.cancel(check=False)

