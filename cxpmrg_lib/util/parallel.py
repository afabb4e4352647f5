"""Independent trainings side by side, in worker processes.

A training step of the tiny models is many small operations that two threads share
badly. On the 2-core machine two 1-thread processes side by side did 1.15-1.5x the
stage-3 training steps per second of one 2-thread process, and 1.3-1.6x with the encoder
frozen (the frozen language model alone), over several noisy runs (`make bench` measures
it again: benchmarks/bench_parallel.py). So where a notebook has
runs that do not need each other (02's two stage-2 runs, 03's three stage-3 runs, the
benchmark's systems) it trains them in `jobs` worker processes with cores / jobs
threads each.

`jobs` 0 means automatic: one worker per CPU core (at most MAX_AUTO_JOBS; one more when
there is exactly one task more than that) on the CPU, a single in-process job on CUDA (one
GPU, one process). CXPMRG_JOBS in the environment
overrides the automatic choice. With one job everything runs in this process, in order,
as it would without this module. Runs that two jobs share are trained once: a stage
holds its run folder while it trains it (runlock), and the other job waits and reuses it.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from typing import Any, Callable, Iterator, Sequence

from cxpmrg_lib.util import runlock

log = logging.getLogger(__name__)

__all__ = ["default_jobs", "Workers", "map_parallel", "call", "MAX_AUTO_JOBS"]

MAX_AUTO_JOBS = 4


def default_jobs(device: str = "cpu", tasks: int | None = None, jobs: int = 0) -> int:
    """How many worker processes: `jobs` when > 0, else CXPMRG_JOBS, else one per core on the
    CPU (at most MAX_AUTO_JOBS) and 1 on CUDA; never more than `tasks`."""
    if jobs < 0:
        raise ValueError(f"jobs must be >= 0 (0: automatic), got {jobs}")
    if not jobs:
        env = os.environ.get("CXPMRG_JOBS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"CXPMRG_JOBS must be a whole number >= 1, got {env!r}")
            jobs = int(env)
        elif _uses_cuda(device):
            jobs = 1
        else:
            jobs = min(os.cpu_count() or 1, MAX_AUTO_JOBS)
            if tasks == jobs + 1:
                # One worker more than cores when that saves a second round: 3 runs on 2 cores share
                # them and end together (measured 1.6x one 2-thread process), where 2 workers would
                # leave the third run alone on one core afterwards (no faster than one process).
                jobs = tasks
    return max(1, min(jobs, tasks)) if tasks is not None else jobs


def _uses_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return True


def _init_worker(threads: int) -> None:
    import torch

    os.environ["TQDM_DISABLE"] = "1"           # bars of several processes would interleave
    torch.set_num_threads(threads)
    # warnings only: this process reports each job as it ends, and workers' progress lines would interleave
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [worker %(process)d] %(name)s: %(message)s")


def call(function: Callable) -> Any:
    """function(): for running a list of ready-made calls (functools.partial) as the tasks."""
    return function()


def _call(fn: Callable, task: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    try:
        return fn(task), time.perf_counter() - t0
    finally:
        runlock.release_all()


class Workers:
    """A pool of `jobs` worker processes (or none when jobs is 1), used as a context manager:

        with Workers(jobs, device) as workers:
            for i, result in workers.run(fn, tasks, labels):
                ...

    `fn` must be importable (a module-level function, or a functools.partial of one) and
    the tasks picklable. A failed job stops the pool and raises its error, with a note
    naming the job; jobs that finished before it have already been handed back.
    """

    def __init__(self, jobs: int = 0, device: str = "cpu", tasks: int | None = None):
        self.jobs = default_jobs(device, tasks, jobs)
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs)
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> "Workers":
        if self.jobs > 1:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(self.threads,))
            log.info("%d worker processes, %d thread(s) each", self.jobs, self.threads)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is None:
            return
        if exc_type is not None:                 # an error or an interrupt: stop what still runs
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
        else:
            self._pool.shutdown()
        self._pool = None

    def run(self, fn: Callable, tasks: Sequence, labels: Sequence[str] | None = None,
            desc: str = "jobs") -> Iterator[tuple[int, Any]]:
        """(index, result) of every task: in order with one job, as they finish with several."""
        labels = list(labels) if labels is not None else [f"{desc} {i + 1}" for i in range(len(tasks))]
        if self._pool is None:
            for i, task in enumerate(tasks):
                result, seconds = _call(fn, task)
                log.info("%s done in %.1f min", labels[i], seconds / 60)
                yield i, result
            return
        from cxpmrg_lib.util.progress import tqdm

        futures = {self._pool.submit(_call, fn, task): i for i, task in enumerate(tasks)}
        try:
            with tqdm(total=len(futures), desc=desc, unit="job") as bar:
                for future in cf.as_completed(futures):
                    i = futures[future]
                    try:
                        result, seconds = future.result()
                    except cf.process.BrokenProcessPool as err:
                        raise RuntimeError(
                            f"a worker process died while running {labels[i]}: killed for memory, or a script "
                            "that starts workers without an `if __name__ == '__main__':` guard; run with one job "
                            "(jobs=1 or CXPMRG_JOBS=1) to see") from err
                    except BaseException as err:
                        err.add_note(f"in the worker job {labels[i]!r}")
                        raise
                    log.info("%s done in %.1f min (worker)", labels[i], seconds / 60)
                    bar.update()
                    yield i, result
        finally:
            for future in futures:
                future.cancel()


def map_parallel(fn: Callable, tasks: Sequence, jobs: int = 0, device: str = "cpu",
                 labels: Sequence[str] | None = None, desc: str = "jobs") -> list:
    """[fn(task) for task in tasks], computed by `jobs` workers (see Workers), in the tasks' order."""
    results: list = [None] * len(tasks)
    with Workers(jobs, device, tasks=len(tasks)) as workers:
        for i, result in workers.run(fn, tasks, labels, desc):
            results[i] = result
    return results
