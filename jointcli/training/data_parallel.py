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
process. The processes die with their parent (a killed run leaves none training behind), process 0's
progress shows on the console, the others' output goes to a log next to the adapter folder, and a
failure in any of them is one StepError in the parent.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, JointoptError, StepError
from ..files import write_atomic
from ..weights.device import cpu_budget


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: `index` of `count` (0 of 1: alone)."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0

    def share(self, rows: list[int]) -> list[int]:
        """The rows of an optimizer step this process computes: every count-th, from its index."""
        return rows[self.index :: self.count]

    def sum_step(self, params: list, nll: float, tokens: int) -> tuple[float, int]:
        """Sum the gradients of `params` (in place), the step's NLL and token count over the processes."""
        if self.count == 1:
            return nll, tokens
        import torch
        import torch.distributed as dist

        for p in params:  # a process whose share was empty has no gradients yet
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat(
            [p.grad.reshape(-1) for p in params]
            + [torch.tensor([nll, float(tokens)], dtype=params[0].grad.dtype, device=params[0].device)]
        )
        dist.all_reduce(flat)  # one call for the whole adapter
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return float(flat[-2]), int(round(float(flat[-1])))

    def barrier(self) -> None:
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier()


def launch(processes: int, device: str, out_dir: Path, job: dict) -> dict:
    """Run `lora._train_locked(**job)` in `processes` processes and wait for them; the training.json
    that process 0 wrote into out_dir. The caller holds out_dir's lock."""
    if device == "cuda":
        import torch

        if processes > torch.cuda.device_count():
            raise InputError(
                f"train.processes={processes}, but torch sees {torch.cuda.device_count()} "
                "CUDA GPU(s): one process per GPU"
            )
    stem = f".{out_dir.name}.processes"  # next to the adapter folder, like its lock and work folder
    job_file, log_file = out_dir.parent / f"{stem}.json", out_dir.parent / f"{stem}.log"
    errors = [_error_file(job_file, rank) for rank in range(processes)]
    for path in errors:
        path.unlink(missing_ok=True)
    write_atomic(job_file, json.dumps(job) + "\n")
    threads = max(1, cpu_budget() // processes)
    env = {
        **os.environ,
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": str(threads),
    }
    command = [sys.executable, "-m", __name__, str(job_file)]
    with open(log_file, "w") as others:
        procs = [
            subprocess.Popen(
                command,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=sys.__stderr__ if rank == 0 else others,
                stderr=None if rank == 0 else others,
                preexec_fn=_die_with_parent,
            )
            for rank in range(processes)
        ]
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
        path.unlink(missing_ok=True)
    from .lora import RESULT_FILE

    return json.loads((out_dir / RESULT_FILE).read_text())


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
    job = json.loads(job_file.read_text())
    rank = int(os.environ["RANK"])
    try:
        from accelerate import PartialState

        from ..recipe import Lora, Train
        from .lora import SoftTraining, _train_locked

        state = PartialState(cpu=job["device"] == "cpu")
        ranks = Ranks(state.process_index, state.num_processes)
        _train_locked(
            Path(job["checkpoint"]),
            job["pairs"],
            Path(job["out_dir"]),
            Lora(**job["lora"]),
            Train(**job["train"]),
            job["seed"],
            Path(job["log_path"]) if job["log_path"] else None,
            job["device"],
            job["resume"],
            job["dtype"],
            Path(job["init_adapter"]) if job["init_adapter"] else None,
            job["token_budget"],
            SoftTraining.from_json(job["soft"]) if job.get("soft") else None,
            ranks,
        )
        state.wait_for_everyone()
        state.destroy_process_group()
        return 0
    except Exception as err:  # noqa: BLE001 - any failure is reported to the parent in one line
        message = str(err) if isinstance(err, JointoptError) else f"{type(err).__name__}: {err}"
        write_atomic(_error_file(job_file, rank), f"process {rank}: {message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
