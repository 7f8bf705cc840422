"""The end-to-end benchmark: wall time and peak memory of `jointopt joint recipes/sst2.yaml`, step by
step, what the memory is made of, and the time of resuming the finished run.

    .venv/bin/python bench/joint_run.py                  # the shipped recipe (p -> w -> p), ~10 minutes
    .venv/bin/python bench/joint_run.py data.split.dev=20  # overrides go to the recipe
    .venv/bin/python bench/joint_run.py --keep=runs/bench  # keep the run directory
    .venv/bin/python bench/joint_run.py --dev-only optimizers.w.train.epochs=1   # tuning: hide test
    .venv/bin/python bench/joint_run.py --no-breakdown     # the run only

With --dev-only the test scores are not printed, and the answer shares are those of the best step
on dev: settings are chosen on dev, and the test split stays a one-time read.

The run starts cold: a fresh $JOINTOPT_HOME (so DSPy's LM cache is empty) that borrows the already
converted model, and a fresh run directory. Then the same command runs again on the finished run
(a resume: nothing to do but read the run directory). Peak RSS is the largest resident set of the
run's process (getrusage of the children: the kernel's own maximum); each step's peak is sampled
every 50 ms (psutil), the step read from the run's manifest.

The breakdown runs the weight step's pieces one by one in a fresh process, on the rows the run's
first weight step trained on, and reads the RSS after each (psutil; activations: the highest RSS
during one optimizer step less the RSS before it): the libraries, the engine's model, the engine's
prefix cache after serving those rows' prompts (and what emptying it gave back), the training
model (and the bytes it shares with the engine), AdamW's state, the activations at the token
budget. Sizes are in GB of 2^30 bytes, as `jointopt plan` prints them. Prints one line per figure:

    joint_wall: <seconds> s (target 600 s)
    resume_wall: <seconds> s (target 5 s)
    joint_peak_rss: <GB> GB (target 3 GB)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30
SAMPLE_S = 0.05


def joint(home: Path, runs: Path, overrides: list[str]) -> tuple[float, dict[str, int]]:
    """Run `jointopt joint` on the copy of the recipe in `home`: (seconds, the highest RSS sampled
    during each step)."""
    env = {**os.environ, "JOINTOPT_HOME": str(home)}
    argv = [sys.executable, "-m", "jointcli.cli", "joint", str(home / "sst2.yaml"), *overrides]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*argv, "--runs-dir", str(runs)], env=env, cwd=ROOT, stdout=err, stderr=err, text=True)
        peaks = sample_steps(proc, runs / "sst2" / "manifest.json")
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"jointopt joint failed ({proc.returncode}):\n{err.read()[-3000:]}")
    return seconds, peaks


def sample_steps(proc: subprocess.Popen, manifest: Path) -> dict[str, int]:
    """The highest RSS of the process (and any children) while each step of the manifest ran, until it
    ends; "start" before the first step, "test" after the last."""
    peaks: dict[str, int] = {}
    me, label = psutil.Process(proc.pid), "start"
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])
        except psutil.Error:
            rss = 0
        label = running_step(manifest) or label
        peaks[label] = max(peaks.get(label, 0), rss)
        time.sleep(SAMPLE_S)
    return peaks


def running_step(manifest: Path) -> str | None:
    """The step the manifest says is running ("test" once all are done); None when it cannot be read."""
    try:
        steps = json.loads(manifest.read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return None
    running = [s for s in steps if s.get("status") != "done"]
    return f"{running[0]['index']:02d}-{running[0]['kind']}" if running else ("test" if steps else "start")


def answer_shares(run: Path, manifest: dict, split: str = "test") -> str:
    """What the shipped program answers on a split, against the gold labels: a program that gives one
    answer to everything scores the majority share, whatever its score says."""
    name = "predictions-test.jsonl" if split == "test" else "predictions.jsonl"
    rows = [json.loads(x) for x in (run / manifest["best"] / name).read_text().splitlines()]
    label = lambda d: "(no answer)" if not d else str(next(iter(d.values())))  # noqa: E731
    said, gold = Counter(label(r["prediction"]) for r in rows), Counter(label(r["gold"]) for r in rows)
    share = lambda c: ", ".join(f"{k} {v / len(rows):.2f}" for k, v in c.most_common())  # noqa: E731
    return f"{share(said)} (gold: {share(gold)})"


# ---------------------------------------------------------------- the breakdown (a process of its own)
class Meter:
    """RSS now, and the highest RSS since the last `mark` (a thread samples it every millisecond or so)."""

    def __init__(self):
        self.process, self.high, self.lines = psutil.Process(), 0, []
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.high = max(self.high, self.process.memory_info().rss)
            time.sleep(0.002)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def mark(self) -> int:
        now = self.rss()
        self.high = now
        return now

    def line(self, what: str, nbytes: float, note: str = "") -> None:
        self.lines.append(f"  {what:<34} {nbytes / GB:6.2f} GB  {note}")
        print(self.lines[-1], flush=True)


def breakdown(traces: Path, recipe_path: Path, overrides: list[str]) -> None:
    """The memory of the weight step's pieces, loaded one after the other in this process."""
    meter = Meter()
    start = meter.mark()
    from jointcli.weights.device import set_process_defaults

    set_process_defaults()
    import dspy  # noqa: F401  the libraries a run loads
    import torch

    from jointcli.inference.engine import get_engine
    from jointcli.recipe.load import load_recipe
    from jointcli.training import loop, lora  # noqa: F401
    from jointcli.weights.memory import release_memory

    meter.line("libraries (torch, transformers, DSPy)", meter.mark() - start)
    recipe = load_recipe(recipe_path, overrides)
    spec, weight = recipe.models["small"], recipe.optimizers["w"]
    before = meter.mark()
    engine = get_engine(spec.path, spec.dtype, spec.device, spec.limits)
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    meter.line("engine model", meter.mark() - before, f"({str(engine.dtype)[6:]}; weights {weights / GB:.2f} GB)")
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    before = meter.mark()
    serve(engine, spec, rows)
    cached = sum(t.numel() * t.element_size() for kv in engine.decoder.prefixes.entries.values() for p in kv for t in p)
    meter.line("engine calls and prefix cache", meter.mark() - before, f"(cache {cached / GB:.2f} GB)")
    before = meter.rss()
    release_memory()
    meter.line("given back before training", before - meter.mark(), "(prefix cache, garbage, malloc_trim)")
    train(meter, rows, recipe, weight, torch)


def serve(engine, spec, rows: list[dict]) -> None:
    """The prompts of the training rows through the engine, 16 at a time (as runtime.num_threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from jointcli.models.local import engine_lm

    lm = engine_lm("small", spec, engine, cache=False)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda r: lm(messages=r["messages"][:-1]), rows[:64]))


def train(meter: Meter, rows: list[dict], recipe, weight, torch) -> None:
    """The training model, AdamW's state and one optimizer step's activations, as the weight step has them."""
    from jointcli.training import loop
    from jointcli.training.job import TrainJob
    from jointcli.training.model import load_for_training, start_optimizer
    from jointcli.training.rows import prepare_data, to_prompt_completion
    from jointcli.weights.checkpoint import resolve_checkpoint
    from jointcli.weights.device import resolve_device, resolve_train_dtype

    device = resolve_device(recipe.models["small"].device)
    dtype = resolve_train_dtype(weight.train.dtype, device)
    checkpoint = resolve_checkpoint(recipe.models["small"].path)
    job = TrainJob(
        checkpoint, to_prompt_completion(rows), Path("unused"), weight.lora, weight.train, 0, None, device, dtype
    )
    data = prepare_data(checkpoint, job.pairs, weight.train.max_length, 0)
    before = meter.mark()
    model = load_for_training(checkpoint, weight.lora, device, dtype, 0)
    with torch.no_grad():  # read every weight once: the file's pages are resident, as in training
        sum(float(p.sum()) for p in model.parameters())
    shared = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and is_shared(p))
    meter.line("training model", meter.mark() - before, f"({dtype}; {shared / GB:.2f} GB shared with the engine)")
    state = start_optimizer(model, job)
    plan = loop._training_plan(job, data, loop.Ranks(), None)
    before = meter.mark()
    loop._train_step(job, state, data, plan.steps[0], 1.0, plan.ranks)
    activations = meter.high - before
    moments = sum(t.numel() * t.element_size() for s in state.optimizer.state.values() for t in s.values())
    grads = sum(p.numel() * p.element_size() for p in state.params)
    meter.line("optimizer state (LoRA, grads, AdamW)", grads * 2 + moments)
    meter.line(f"activations at {job.token_budget} tokens", activations, f"(peak {meter.high / GB:.2f} GB)")


def is_shared(p) -> bool:
    """A frozen parameter whose storage is the engine's (weights/memory.py)."""
    from jointcli.inference.engine import _ENGINES

    return any(p.data_ptr() == q.data_ptr() for e in _ENGINES.values() for q in e.model.parameters())


# ---------------------------------------------------------------- main
def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--breakdown":
        return breakdown(Path(args[1]), Path(args[2]), args[3:])
    dev_only, with_breakdown = "--dev-only" in args, "--no-breakdown" not in args
    overrides = [a for a in args if not a.startswith("--keep=") and a not in ("--dev-only", "--no-breakdown")]
    keep = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("--keep=")), None)
    from jointcli.weights.checkpoint import jointopt_home, resolve_checkpoint

    resolve_checkpoint("builtin:smollm2-135m-instruct")  # convert once, outside the timed run
    with tempfile.TemporaryDirectory(prefix="jointopt-bench-") as tmp:
        home, runs = Path(tmp) / "home", Path(tmp) / "runs"
        home.mkdir()
        (home / "models").symlink_to(jointopt_home() / "models")
        shutil.copy(ROOT / "recipes" / "sst2.yaml", home / "sst2.yaml")  # the run and its resumes: one recipe
        wall, peaks = joint(home, runs, overrides)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB  # KiB on Linux
        print(f"peak RSS by step: {', '.join(f'{k} {v / GB:.2f} GB' for k, v in peaks.items())}", flush=True)
        resume = min(joint(home, runs, overrides)[0] for _ in range(3))  # 3 tries: the machine is shared
        manifest = json.loads((runs / "sst2" / "manifest.json").read_text())
        answers = answer_shares(runs / "sst2", manifest, "dev" if dev_only else "test")
        traces = next((runs / "sst2").glob("*-w/traces.jsonl"), None)
        lines = breakdown_lines(traces, home / "sst2.yaml", overrides) if with_breakdown and traces else []
        if keep is not None:
            shutil.copytree(runs / "sst2", keep)
    report(manifest, overrides, dev_only, answers, peaks, lines, wall, resume, peak_gb)


def breakdown_lines(traces: Path, recipe: Path, overrides: list[str]) -> list[str]:
    argv = [sys.executable, __file__, "--breakdown", str(traces), str(recipe), *overrides]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return [f"  (the breakdown failed: {out.stderr.strip().splitlines()[-1:]})"]
    return [line for line in out.stdout.splitlines() if line.startswith("  ")]


def report(manifest, overrides, dev_only, answers, peaks, lines, wall, resume, peak_gb) -> None:
    from jointcli.weights.device import cpu_kind, resolve_dtype

    where = f"[cpu {cpu_kind()}; engine {str(resolve_dtype('auto', 'cpu'))[6:]}, LoRA float32]"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {where}")
    print(f"overrides: {' '.join(overrides) or '(none)'}")
    for s in manifest["steps"]:
        shown = {k: v for k, v in s["scores"].items() if not (dev_only and k == "test")}
        scores = ", ".join(f"{k} {v:.3f}" for k, v in shown.items())
        label = f"{s['index']:02d}-{s['kind']}"
        rss = f"peak RSS {peaks.get(label, 0) / GB:.2f} GB"
        print(f"  {label:<12} {s['seconds']:7.1f} s   {rss}   {scores}")
    print(f"  {'test':<12} {'':9}   peak RSS {peaks.get('test', 0) / GB:.2f} GB   (the test evaluation)")
    print(f"answers of the best step ({manifest.get('best')}) on {'dev' if dev_only else 'test'}: {answers}")
    if lines:
        print("memory of the weight step, piece by piece (a fresh process; RSS added by each):")
        print("\n".join(lines))
    print(f"joint_wall: {wall:.0f} s (target 600 s) {where}")
    print(f"resume_wall: {resume:.1f} s (target 5 s) {where}")
    print(f"joint_peak_rss: {peak_gb:.2f} GB (target 3 GB) {where}")


if __name__ == "__main__":
    main()
