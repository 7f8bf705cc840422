"""Data-parallel LoRA training: a weight step's optimizer steps shared by several processes.

    jointopt finetune recipes/sst2.yaml optimizers.w.train.processes=2    # or `processes: 2` in the recipe

Each optimizer step's rows are dealt out to the processes (`Ranks.share`); each computes the
gradient of its share, its loss divided by the completion-token count of the whole step, and the
gradients are summed across the processes before clipping and the AdamW update. Every process then
holds the same adapter after every step, the adapter one process would have trained (up to the order
of float additions: tested). Process 0 alone writes the train log, the checkpoints and the adapter,
so the run directory is the same whatever the number of processes.

`launch` starts the processes from the one that holds the adapter folder's lock (lora.train_lora):
one per rank with torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
which accelerate's PartialState turns into a process group: gloo on CPU, NCCL on GPUs, one GPU per
process. Each runs loop.train_in_process with its `Ranks` (ranks.py). The processes die with their
parent (a killed run leaves none training behind), process 0's progress shows on the console, the
others' output goes to a log next to the adapter folder, and a failure in any of them is one
StepError in the parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InputError, JointoptError, StepError
from ..files import open_log, read_json, remove_path, write_atomic, write_json
from ..weights.device import cpu_budget
from .job import RESULT_FILE, TrainJob, TrainResult
from .loop import train_in_process
from .ranks import Ranks


def launch(job: TrainJob) -> TrainResult:
    """Run `loop.train_in_process(job)` in job.train.processes processes and wait for them; the result
    that process 0 wrote into job.out_dir. The caller holds job.out_dir's lock."""
    processes = job.train.processes
    if job.device == "cuda":
        _check_gpus(processes)
    stem = f".{job.out_dir.name}.processes"  # next to the adapter folder, like its lock and work folder
    job_file, log_file = job.out_dir.parent / f"{stem}.json", job.out_dir.parent / f"{stem}.log"
    errors = [_error_file(job_file, rank) for rank in range(processes)]
    for path in errors:
        remove_path(path)
    write_json(job_file, job.to_json())
    env = _environment(processes)
    with open_log(log_file) as others:
        procs = [_start(job_file, rank, env, others) for rank in range(processes)]
        try:
            failed = _wait(procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if failed is not None:
        said = [p.read_text().strip() for p in errors if p.is_file()]
        cause = said[0] if said else f"process {failed} exited with {procs[failed].returncode} (see {log_file})"
        raise StepError(f"LoRA training in {processes} processes failed: {cause}")
    for path in (job_file, log_file):
        remove_path(path)
    return TrainResult.from_json(read_json(job.out_dir / RESULT_FILE))


def _check_gpus(processes: int) -> None:
    import torch

    if processes > torch.cuda.device_count():
        raise InputError(
            f"train.processes={processes}, but torch sees {torch.cuda.device_count()} CUDA GPU(s): one process per GPU"
        )


def _environment(processes: int) -> dict[str, str]:
    """torch.distributed's environment for `processes` processes on this machine, all but the rank."""
    return {
        **os.environ,
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": str(max(1, cpu_budget() // processes)),
    }


def _start(job_file: Path, rank: int, env: dict[str, str], others) -> subprocess.Popen:
    """Training process `rank`; process 0's output on the console, the others' into `others`."""
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(job_file)],
        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        stdout=sys.__stderr__ if rank == 0 else others,
        stderr=None if rank == 0 else others,
        preexec_fn=_die_with_parent,
    )


def _wait(procs: list[subprocess.Popen]) -> int | None:
    """Wait for every process; the rank of the first that fails (the others are then stopped)."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            return failed[0]
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.2)


def _error_file(job_file: Path, rank: int) -> Path:
    return job_file.with_name(f"{job_file.stem}.error-{rank}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _worker(job_file: Path) -> int:
    """One training process: join the group, train this rank's share, report a failure in one line."""
    job = TrainJob.from_json(read_json(job_file))
    rank = int(os.environ["RANK"])
    try:
        from accelerate import PartialState

        state = PartialState(cpu=job.device == "cpu")
        train_in_process(job, Ranks(state.process_index, state.num_processes))
        state.wait_for_everyone()
        state.destroy_process_group()
        return 0
    except Exception as err:  # noqa: BLE001 - any failure is reported to the parent in one line
        message = str(err) if isinstance(err, JointoptError) else f"{type(err).__name__}: {err}"
        write_atomic(_error_file(job_file, rank), f"process {rank}: {message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
