"""Shared fixtures: tiny configs and a helper that runs the pretraining entry point as a user would."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic_tiny.yaml"
# `make test` runs the suite on pytest-xdist workers, one per core: most tests wait on a one-thread subprocess, and
# one worker left a core idle. Each worker's own torch (in-process tests) then takes its share of the cores, set
# before torch is imported: OpenMP threads beyond the cores spin against each other (up to 20x slower).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = max(1, len(os.sched_getaffinity(0)) // WORKERS)
os.environ.setdefault("OMP_NUM_THREADS", str(CORES))
# Runs started here take one OpenMP thread: runs compared bit for bit must use the same count, and several
# processes on 2 cores would spin against each other. A lone run on real data takes this worker's cores.
ALL_CORES = {"OMP_NUM_THREADS": str(CORES)}


def run_main(*overrides: str, config: Path = TINY, launcher: list[str] | None = None, timeout: float = 300,
             check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python pretrain/main.py --config ... overrides` (or under `launcher`), captured."""
    cmd = [*(launcher or [sys.executable]), str(REPO / "pretrain" / "main.py"), "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def in_process(capsys: pytest.CaptureFixture, main: Callable[[list[str]], int], argv: list[str], cwd: Path = REPO,
               env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """An entry point's ``main(argv)`` run in this process, in ``cwd`` with ``env`` added to the environment: (exit
    code, stdout, stderr followed by the warnings a process would print, under the interpreter's default filters).

    For cases where the process itself is not under test: a subprocess pays torch's import (seconds) for each.
    accelerate's state is one per process (another test's Accelerator(cpu=True) would refuse this run's precision),
    and the entry points set signal handlers, environment variables, torch's seed, threads (an FFCV loader sets
    them to its workers) and kernel choice: each run starts from none of them and leaves the test process as it
    found it."""
    import random
    import signal

    import numpy as np
    import torch
    from accelerate.state import AcceleratorState, GradientState

    def reset_accelerate() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    here, environ = os.getcwd(), dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    kernels = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
               torch.backends.cudnn.benchmark)
    threads = torch.get_num_threads()
    reset_accelerate()
    if env or cwd != REPO:  # the writer's and the loaders' children must not inherit this run's env and directory
        start_fork_server()
    try:
        os.chdir(cwd)
        os.environ.update(env or {})
        with warnings.catch_warnings(record=True) as caught:  # a process prints them to stderr; pytest keeps them
            warnings.resetwarnings()  # the interpreter's own filters, which hide deprecations outside __main__
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's refusals, and sys.exit(code or message)
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        reset_accelerate()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        torch.use_deterministic_algorithms(kernels[0], warn_only=kernels[1])
        torch.backends.cudnn.benchmark = kernels[2]
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)


def main_in_process(capsys: pytest.CaptureFixture, *overrides: str, config: Path = TINY) -> tuple[int, str, str]:
    """pretrain/main.py's ``main`` run in this process (:func:`in_process`). The real process's exit code and
    stderr are tested in test_config.py."""
    from infomax.launch.pretrain import main

    return in_process(capsys, main, ["--config", str(config), *overrides])


def pretrain_in_process(capsys: pytest.CaptureFixture, *overrides: str, config: Path = TINY,
                        check: bool = True) -> subprocess.CompletedProcess:
    """:func:`main_in_process` shaped as :func:`run_main`'s result (returncode, stdout, stderr), raising on
    failure with ``check``: for runs whose resume, refusal or fallback is under test, not their process."""
    code, out, err = main_in_process(capsys, *overrides, config=config)
    if check and code != 0:
        raise AssertionError(f"pretrain/main.py {' '.join(overrides)} exited {code}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(["pretrain/main.py", *overrides], code, out, err)


@pytest.fixture
def pretrain(capsys: pytest.CaptureFixture) -> Callable[..., subprocess.CompletedProcess]:
    """``pretrain(*overrides, check=True)``: :func:`pretrain_in_process` with this test's capsys."""
    return functools.partial(pretrain_in_process, capsys)


# Accelerate builds its process group from these: one left behind by a test makes every later Accelerator in that
# worker wait for ranks that never come (a 30 min rendezvous timeout, seen only when xdist orders the tests so).
PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def process_group_env_is_left_as_found():
    """Fail the test that leaves a process-group variable behind, not the unrelated test that runs next."""
    before = {key: os.environ.get(key) for key in PROCESS_GROUP_ENV}
    yield
    after = {key: os.environ.get(key) for key in PROCESS_GROUP_ENV}
    assert after == before, f"the test left process-group variables set: {after} (use monkeypatch.setenv)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest work first. pytest-xdist hands tests to its workers in collection order, and the alphabet put the
    longest serial chains last (the SLURM tests, minutes on one worker; the resume and pretraining groups; the
    rehearsal): a worker then ran them alone at the end. The grouped modules go first, then the other end-to-end
    scenarios (``slow``), then the short tests, which even out the workers' ends. The sort is stable, so each
    module keeps its order and its module-scoped fixtures are built once."""
    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("xdist_group") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The one-node SLURM cluster of tests/slurm/start.sh, up for the session, stopped even on failure."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the SLURM tests need root to start slurmd; CI runs as root")
        pytest.skip("the SLURM tests need root to start slurmd (run `make test` as root)")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the run's workers share their basetemp's parent
        try:
            (tmp_path_factory.getbasetemp().parent / "slurm-cluster").open("x").close()
        except FileExistsError:
            pytest.fail("a second SLURM cluster in one test run: the SLURM tests must share one worker. Run them "
                        "with --dist loadgroup (as `make test` does), under pytest<9 (`make setup` installs it: "
                        "pytest-xdist ignores xdist_group under pytest 9)")
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start.sh"), str(state)], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["bash", str(REPO / "tests" / "slurm" / "stop.sh"), str(state)], timeout=60)
        pytest.fail(f"tests/slurm/start.sh failed:\n{proc.stderr[-4000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(REPO / "tests" / "slurm" / "stop.sh"), str(state)], timeout=60)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def synthetic_views(n: int, image_size: int):
    """``n`` synthetic training images (8 classes, ``image_size`` px) through the default training view
    (a 32 px crop): the input of the eval stage's SGD fits in unit tests."""
    from infomax.config.pretrain import ViewConfig
    from infomax.data import MultiViewDataset, build_view_transform
    from infomax.data.datasets import open_dataset

    images = open_dataset("synthetic", "train", synthetic_size=n, synthetic_image_size=image_size)
    return MultiViewDataset(images, [build_view_transform(ViewConfig(), 3, images.mean, images.std)], seed=0)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fork_server() -> None:
    """This pytest process's one fork server, started from its own environment and directory, with the imports of
    everyone who forks from it: the gloo ranks of :func:`spawn_ranks`, the .beton writer and the feature loader's
    workers (each imported once, instead of seconds for each child). Whoever starts it sets its imports, and every
    child inherits its environment and directory, so it starts before an entry point runs in this process."""
    import multiprocessing
    import multiprocessing.forkserver

    from infomax.data.beton import WRITER_PRELOAD
    from infomax.features.extract import WORKER_PRELOAD

    multiprocessing.set_forkserver_preload([*WRITER_PRELOAD, *WORKER_PRELOAD, "torch.distributed",
                                            "infomax.method.objectives"])
    multiprocessing.forkserver.ensure_running()


def spawn_ranks(worker, tmp_path: Path, *args, nprocs: int = 2) -> None:
    """``worker(rank, str(tmp_path), *args)`` in ``nprocs`` processes, once more on a fresh rendezvous
    when a rank was killed by a signal: gloo can abort (SIGABRT) while ranks tear down on a loaded
    machine, as a CI run showed. A rank that raises (a failed check) is never retried.

    The ranks fork from the fork server of :func:`start_fork_server`. A rank's environment is the server's: pass
    what a rank needs as arguments, never through ``os.environ``."""
    import torch.multiprocessing as mp

    start_fork_server()
    inputs = set(tmp_path.iterdir())  # what the test wrote for its ranks: kept for the second attempt
    for attempt in (1, 2):
        try:
            mp.start_processes(worker, args=(str(tmp_path), *args), nprocs=nprocs, join=True,
                               start_method="forkserver")
            return
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt == 2:
                raise
            for f in set(tmp_path.iterdir()) - inputs:  # the file store and any rank's results of the aborted attempt
                if f.is_file():
                    f.unlink()


def contrastive(temperature: float, bound: str = "infonce", *, num_views: int = 2, dim: int = 128, **options):
    """The contrastive objective as a run builds it, from ``objective.*`` settings (``options``: queue_size, critic,
    intra_view_negatives, nn_support_size, debias_tau_plus, graph, ...) for ``num_views`` views of ``dim``."""
    from infomax.config.pretrain import ObjectiveConfig
    from infomax.method.objectives import build_objective

    return build_objective(ObjectiveConfig(temperature=temperature, bound=bound, **options), num_views, dim)
