"""The same small sweep run serially and on a local Ray: the wall-time ratio, and the same scores.

    .venv/bin/python bench/ray_sweep.py                       # none, p, w x seeds 0,1 on a small split
    .venv/bin/python bench/ray_sweep.py data.split.dev=100    # overrides go to the recipe

Both run cold in fresh $JOINTOPT_HOME folders (DSPy's LM cache empty; the converted model borrowed),
one after the other in this process's children. On Ray each run is a process of its own that loads
the model itself, and runs go side by side as far as the CPUs allow (one CPU each); the serial
sweep loads the model once. Prints:

    serial_wall: <seconds> s
    ray_wall: <seconds> s
    ray_over_serial: <ratio>
    same_scores: True|False
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = "none, p, w"
SMALL = ["data.split.train=16", "data.split.dev=40", "data.split.test=40", "models.small.max_tokens=24"]


def sweep(home: Path, runs: Path, overrides: list[str], ray: bool) -> float:
    env = {**os.environ, "JOINTOPT_HOME": str(home)}
    command = [sys.executable, "-m", "jointcli.cli", "sweep", str(ROOT / "recipes" / "sst2.yaml"), *overrides]
    command += ["--strategies", STRATEGIES, "--seeds", "0,1", "--runs-dir", str(runs), *(["--ray"] if ray else [])]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"jointopt sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def scores(runs: Path) -> dict:
    return {
        str(m.parent.relative_to(runs)): [s["scores"] for s in json.loads(m.read_text())["steps"]]
        for m in sorted(runs.glob("*/*/seed-*/manifest.json"))
    }


def fresh_home(scratch: Path, name: str) -> Path:
    """A JOINTOPT_HOME with an empty cache that borrows the converted model."""
    from jointcli.weights.checkpoint import jointopt_home, resolve_checkpoint

    resolve_checkpoint("builtin:smollm2-135m-instruct")  # converted once, before either sweep
    home = scratch / name
    home.mkdir()
    (home / "models").symlink_to(jointopt_home() / "models")
    return home


def main() -> None:
    overrides = [*SMALL, *sys.argv[1:]]
    cpu = subprocess.run(["grep", "-o", "-m1", "-E", "avx512_bf16|amx_bf16", "/proc/cpuinfo"], capture_output=True)
    print(f"cpu: {os.cpu_count()} cores, {cpu.stdout.decode().strip() or 'avx2 (no native bf16)'}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        serial = sweep(fresh_home(scratch, "home-serial"), scratch / "serial", overrides, ray=False)
        ray = sweep(fresh_home(scratch, "home-ray"), scratch / "ray", overrides, ray=True)
        print(f"serial_wall: {serial:.1f} s")
        print(f"ray_wall: {ray:.1f} s")
        print(f"ray_over_serial: {ray / serial:.2f}")
        serial_scores, ray_scores = scores(scratch / "serial"), scores(scratch / "ray")
        print(f"same_scores: {serial_scores == ray_scores}")
        for run in sorted(set(serial_scores) | set(ray_scores)):
            if serial_scores.get(run) != ray_scores.get(run):
                print(f"  {run}: serial {serial_scores.get(run)}, ray {ray_scores.get(run)}")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
