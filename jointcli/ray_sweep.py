"""`jointopt sweep --ray [ADDRESS]`: the sweep's task graph (sweep_graph.py) on Ray.

    result = run_sweep_ray(Path("recipes/sst2.yaml"), address=None, seeds="0,1,2")  # a local Ray

Each (strategy, seed) is a Ray task that runs its own `jointopt sweep ... --strategies S --seeds N`
in a child process (the same run folder and adoption as in the whole sweep, and a process of its
own: a model, torch's threads and DSPy's settings are per process), after the sibling it adopts from.
Tasks ask for what their recipe needs: a CPU per training process, or a GPU per process when a
local model runs on CUDA. They run as far apart as resources allow, and all write into one runs
root: on a cluster it must be shared storage, at the same path on every node, as must the recipe
and jointopt's installation. Without an address a local Ray starts for the sweep, on loopback, and
stops after it; with one the sweep joins that cluster.

A failed run is reported and the others go on, as in the serial sweep; Ctrl-C cancels the tasks,
whose run folders resume.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from .console import console
from .errors import InputError
from .recipe import Recipe, load_recipe
from .sweep_graph import SweepTask

LOCAL = "local"  # `--ray` without an address


def task_resources(recipe: Recipe, cluster_gpus: float) -> dict:
    """What one run of `recipe` asks Ray for: a GPU per training process when a local model runs on
    CUDA (`device: cuda`, or `auto` on a cluster with GPUs), else a CPU per process."""
    processes = max([1, *(getattr(getattr(o, "train", None), "processes", 1) for o in recipe.optimizers.values())])
    devices = {m.device for m in recipe.models.values() if getattr(m, "type", None) == "local"}
    if "cuda" in devices or ("auto" in devices and cluster_gpus >= 1):
        return {"num_cpus": 1, "num_gpus": processes}
    return {"num_cpus": processes}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """The child ends (SIGTERM: jointopt's clean stop) if the Ray worker that started it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_task(args: list[str], cwd: str, log: str, after: object = None) -> int:
    """The body of a Ray task: `jointopt ARGS` in a child process, its output into the file `log`;
    returns its exit code. `after`, the result of the task it waits for, only orders the two: a failed
    sibling leaves what it finished to adopt."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        command = [sys.executable, "-m", "jointcli.cli", *args]
        child = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            return child.wait()
        except BaseException:  # Ray's cancel (KeyboardInterrupt): stop the run as Ctrl-C would
            child.send_signal(signal.SIGTERM)
            child.wait()
            raise


def run_on_ray(
    tasks: list[SweepTask], recipe_path: Path, overrides: list[str], runs_dir: Path, force: bool, address: str
) -> list[str]:
    """Run the tasks on Ray (a local one for LOCAL, else the cluster at `address`), one line as each
    ends; returns the folders ("<strategy>/seed-<n>") of the runs that failed."""
    try:
        import ray  # the extra: only `--ray` loads it
    except ImportError:
        raise InputError("--ray: Ray is not installed; pip install 'jointopt[ray]'") from None
    if address == LOCAL:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    try:
        options = task_resources(load_recipe(recipe_path, overrides), ray.cluster_resources().get("GPU", 0))
        remote = ray.remote(max_calls=1, **options)(run_task)
        refs: dict = {}
        runs_dir = runs_dir.absolute()
        for task in tasks:  # in a serial sweep's order: a task's sibling is submitted before it
            args = task.args(recipe_path.absolute(), overrides, runs_dir, force)
            after = refs[task.after.id] if task.after else None
            refs[task.id] = remote.remote(args, os.getcwd(), str(log_file(runs_dir, task)), after)
        console.print(f"ray: {len(tasks)} runs, each asking for {_asked(options)}; each one's output: <run folder>.log")
        return _wait(ray, tasks, refs, runs_dir)
    finally:
        ray.shutdown()


def log_file(runs_dir: Path, task: SweepTask) -> Path:
    """Where a task's output goes: beside its run folder, <runs>/<sweep>/<strategy>/seed-<n>.log."""
    return runs_dir / f"{task.folder}.log"


def _wait(ray, tasks: list[SweepTask], refs: dict, runs_dir: Path) -> list[str]:
    """Print a line as each run ends; Ctrl-C cancels those left (their folders resume)."""
    by_ref = {refs[t.id]: t for t in tasks}
    pending, failed = list(by_ref), []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            task, code = by_ref[ready[0]], ray.get(ready[0])
            folder = task.run
            if code:
                failed.append(folder)
            state = "done" if code == 0 else f"[red]failed[/] (exit code {code}; {log_file(runs_dir, task)})"
            console.print(f"ray: {folder} {state}; {len(pending)} left", highlight=False)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, recursive=True)
        raise
    return failed


def _asked(options: dict) -> str:
    return ", ".join(f"{v:g} {k.removeprefix('num_').upper()}" for k, v in options.items())
