"""Worker processes for independent runs, and the run-folder lock that keeps shared runs single."""
import multiprocessing
import os
import time
from functools import partial

import pytest

from cxpmrg_lib.util import runlock
from cxpmrg_lib.util.parallel import MAX_AUTO_JOBS, Workers, call, default_jobs, map_parallel
from cxpmrg_lib.stages.common import StageConfig, finish_run, start_run


def test_default_jobs(monkeypatch):
    monkeypatch.delenv("CXPMRG_JOBS", raising=False)
    assert default_jobs("cpu") == min(os.cpu_count() or 1, MAX_AUTO_JOBS)
    assert default_jobs("cpu", tasks=1) == 1
    cores = min(os.cpu_count() or 1, MAX_AUTO_JOBS)
    assert default_jobs("cpu", tasks=cores + 1) == cores + 1   # one round, not a last run alone
    assert default_jobs("cpu", tasks=cores + 2) == cores
    assert default_jobs("cuda") == 1                          # one GPU, one process
    assert default_jobs("cuda", jobs=3) == 3                  # asked for explicitly
    assert default_jobs("cpu", tasks=2, jobs=8) == 2          # never more workers than jobs
    monkeypatch.setenv("CXPMRG_JOBS", "3")
    assert default_jobs("cpu") == 3 and default_jobs("cpu", jobs=1) == 1
    monkeypatch.setenv("CXPMRG_JOBS", "two")
    with pytest.raises(ValueError, match="CXPMRG_JOBS"):
        default_jobs("cpu")
    with pytest.raises(ValueError, match="jobs"):
        default_jobs("cpu", jobs=-1)


def test_map_parallel_keeps_the_order_and_uses_separate_processes():
    assert map_parallel(abs, [-3, 1, -2, 5], jobs=2) == [3, 1, 2, 5]
    assert map_parallel(abs, [-3, 1], jobs=1) == [3, 1]
    pids = map_parallel(call, [os.getpid] * 4, jobs=2)
    assert os.getpid() not in pids and len(set(pids)) <= 2
    assert map_parallel(call, [os.getpid], jobs=1) == [os.getpid()]   # one job: in this process


def test_workers_split_the_threads():
    import torch

    with Workers(jobs=2) as workers:
        threads = [t for _, t in workers.run(call, [torch.get_num_threads] * 2)]
    assert threads == [max(1, (os.cpu_count() or 1) // 2)] * 2


def test_a_failed_job_names_itself():
    with pytest.raises(ValueError) as err:
        map_parallel(int, ["1", "not a number"], jobs=2, labels=["good", "bad"])
    assert "bad" in "".join(getattr(err.value, "__notes__", []))


def _hold(run_root: str, seconds: float, ready) -> None:
    config = StageConfig(dataset_root=run_root, run_root=run_root)
    run_dir, finished = start_run(config, "demo", {"x": 1}, "demo")
    assert not finished
    ready.set()
    time.sleep(seconds)
    finish_run(run_dir, {"by": os.getpid()})


def test_a_run_trained_by_another_process_is_waited_for_and_reused(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path), 1.5, ready))
    other.start()
    try:
        assert ready.wait(30)
        t0 = time.perf_counter()
        run_dir, finished = start_run(StageConfig(dataset_root=str(tmp_path), run_root=str(tmp_path)), "demo",
                                      {"x": 1}, "demo")
        waited = time.perf_counter() - t0
    finally:
        other.join(30)
    assert finished and waited > 0.5                  # it waited for the other process, then reused its run
    assert (run_dir / "summary.json").read_text().count(str(other.pid)) == 1
    assert runlock.held() == []


def test_a_process_never_waits_for_itself_and_a_crash_frees_the_lock(tmp_path):
    runlock.claim(tmp_path / "run")
    runlock.claim(tmp_path / "run")                   # held already: no deadlock
    assert runlock.held() == [(tmp_path / "run").resolve()]
    runlock.release_all()
    assert runlock.held() == []
    ctx = multiprocessing.get_context("fork")
    crashed = ctx.Process(target=partial(_claim_and_die, str(tmp_path / "run")))
    crashed.start()
    crashed.join(30)
    assert crashed.exitcode == 3
    t0 = time.perf_counter()
    runlock.claim(tmp_path / "run")                   # the dead process's lock is gone with it
    assert time.perf_counter() - t0 < 5
    runlock.release_all()


def _claim_and_die(path: str) -> None:
    runlock.claim(path)
    os._exit(3)


def test_a_waiting_process_times_out_with_the_holder_named(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=partial(_claim_and_hold, str(tmp_path / "run"), ready, done))
    other.start()
    try:
        assert ready.wait(30)
        assert f"pid {other.pid}" in runlock.holder(tmp_path / "run") and "stage 2" in runlock.holder(tmp_path / "run")
        t0 = time.perf_counter()
        with pytest.raises(runlock.RunLockTimeout, match=f"pid {other.pid}"):
            runlock.claim(tmp_path / "run", "demo", timeout=0.5)
        assert 0.4 < time.perf_counter() - t0 < 10
        assert runlock.held() == []
    finally:
        done.set()
        other.join(30)
    runlock.claim(tmp_path / "run", timeout=10)      # released: taken at once
    runlock.release_all()
    assert not (tmp_path / "run" / runlock.HOLDER_NAME).exists()


def _claim_and_hold(path: str, ready, done) -> None:
    runlock.claim(path, "stage 2")
    ready.set()
    done.wait(60)
    runlock.release_all()
