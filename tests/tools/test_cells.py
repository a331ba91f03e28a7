"""Device assignment on one machine: disjoint CUDA_VISIBLE_DEVICES per running cell, and a grid
asking for more GPUs than the machine has is refused in one line before any cell starts."""

from __future__ import annotations

import pytest
from grids import write_grid

from flowtracer.cli import main
from flowtracer.tools.cells import DevicePool
from flowtracer.tools.grid import device_pool, load_grid, visible_devices


def test_device_pool_hands_out_disjoint_sets_and_takes_them_back():
    pool = DevicePool(["0", "1", "2", "3"], per_cell=2)
    first, second = pool.take(), pool.take()
    assert (first, second) == ("0,1", "2,3")
    with pytest.raises(RuntimeError, match="no 2 free GPUs"):
        pool.take()  # a third cell at once would share a GPU
    pool.give(first)
    assert pool.take() == "0,1"
    uuids = DevicePool(["GPU-a", "GPU-b", "GPU-c"], per_cell=1)  # CUDA_VISIBLE_DEVICES may hold UUIDs
    assert {uuids.take() for _ in range(3)} == {"GPU-a", "GPU-b", "GPU-c"}


def test_more_cells_than_gpus_is_refused():
    DevicePool.check(["0", "1", "2", "3"], per_cell=2, parallel=2)  # 4 GPUs, 2 cells of 2: fits
    DevicePool.check([], per_cell=0, parallel=8)  # CPU cells: nothing to share
    with pytest.raises(ValueError, match=r"--parallel 3 x gpus_per_cell 2 needs 6 GPUs, 4 visible .*"
                                         r"lower --parallel to 2"):
        DevicePool.check(["0", "1", "2", "3"], per_cell=2, parallel=3)


def test_visible_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_devices() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_devices() == []


def test_grid_pool_from_the_grid_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine: no GPU
    assert device_pool(load_grid(write_grid(tmp_path, "unused", parallel=4))) is None  # env left alone
    pool = device_pool(load_grid(write_grid(tmp_path, "unused", devices=[4, 5, 6], parallel=3)))
    assert pool.per_cell == 1 and {pool.take() for _ in range(3)} == {"4", "5", "6"}  # default: 1 GPU a cell
    cpu = device_pool(load_grid(write_grid(tmp_path, "unused", devices=[0, 1], gpus_per_cell=0, parallel=4)))
    assert cpu.take() == ""  # gpus_per_cell 0 on a GPU machine: the cells see no GPU


def test_grid_refuses_parallel_above_gpus_in_one_line(tmp_path, capsys):
    cfg = write_grid(tmp_path, "unused", devices=[0, 1, 2, 3], gpus_per_cell=2)
    with pytest.raises(SystemExit) as exit_:
        main(["grid", "--config", str(cfg), "--parallel", "3", "--no-live"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs 6 GPUs, 4 visible" in err and "lower --parallel to 2" in err
    assert not (tmp_path / "grid").exists()  # refused before anything was written
