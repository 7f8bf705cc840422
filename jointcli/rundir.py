"""The run directory `runs/NAME/`: its frozen recipe, manifest, lock and step folders.

    runs/sst2/
      recipe.yaml          the resolved recipe, frozen at the first command
      manifest.json        one entry per step; rewritten atomically after every change
      run.lock             held while a process writes here
      00-baseline/         eval.json, predictions.jsonl
      01-p/                program.json, state.json, eval.json, predictions.jsonl
      02-w/                traces.jsonl, adapters/<module>/, train_log.jsonl, ...

This module writes the run's own files (recipe.yaml, manifest.json, run.lock) and makes, copies
and removes step folders. What a step puts in its folder its code writes: results (evaluations,
traces, program state, adapters) through files.py, logs (dspy.log, train logs) as they come.
Results and the manifest are written to a temporary name in the same folder, flushed, then renamed
over their target, so a killed process leaves either the old file or the new one, never half of
one; the next writer removes the temporaries it left (`remove_temporaries`). A step's entry says
`done` only after all its files are in place: a resume trusts `done` steps whose files are still
there (`damage`) and starts any other step over. A full disk or an unwritable folder is bad input
(`disk_errors`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .failpoints import failpoint
from .files import copy_dir, disk_errors, now, read_json, remove_temporaries, write_atomic, write_json
from .recipe import Recipe, recipe_to_yaml, validate_recipe
from .recipe.schema import run_folder
from .step_kinds import STATE_KINDS, StepKind
from .weights.adapter import ADAPTER_FILES

MANIFEST_VERSION = 1


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()[:16]


@dataclass
class Step:
    """One entry of the manifest."""

    index: int
    kind: str  # a StepKind value (step_kinds.py): init | baseline | eval | p | w | s | bootstrap
    status: str = "running"  # running | done | failed
    started: str = field(default_factory=now)
    ended: str | None = None
    seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def folder(self) -> str:
        return f"{self.index:02d}-{self.kind}"


STATUSES = ("running", "done", "failed")
LOCK_GRACE_S = 0.5  # lock() retries this long: the holder may be letting go (a process ending, a status look)


def eval_files(split: str) -> tuple[str, str, str]:
    """What an evaluation on `split` writes into its step's folder (Context.record_eval): its summary,
    its predictions and, when examples raised or did not parse, those (a bootstrap's: failures.jsonl)."""
    suffix = "" if split == "dev" else f"-{split}"
    return f"eval{suffix}.json", f"predictions{suffix}.jsonl", f"failures-{split}.jsonl"


def _parse_step(entry: Any) -> Step:
    step = Step(**entry)  # TypeError: not a mapping of Step's fields
    if not isinstance(step.index, int) or step.kind not in {k.value for k in StepKind} or step.status not in STATUSES:
        raise ValueError(f"{entry!r:.100}")
    return step


def _damaged_manifest(path: Path, why: str) -> InputError:
    return InputError(
        f"{path}: damaged or unreadable ({why}); the step folders cannot rebuild it: restore it "
        "from a copy, or start the run again under another --name"
    )


class RunDir:
    """A run directory: frozen recipe, manifest, step folders and a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: Path, name: str, recipe: Recipe, force: bool = False) -> RunDir:
        """Create `root/name` for `recipe`, or reopen it if it was made by the same recipe and its
        finished steps are whole; `force` accepts a changed recipe and redoes damaged steps. `name` may
        hold jointopt's own folders (NAME/seed-0), never a way out of `root` (recipe.schema.run_folder)."""
        run = cls(run_folder(root, name))
        if run.path.exists() and not run.path.is_dir():
            raise InputError(f"{run.path}: exists and is not a run directory")
        with disk_errors(run.path):
            run.path.mkdir(parents=True, exist_ok=True)
        run.lock()
        try:
            run._freeze_recipe(recipe, force)
            if not (run.path / "manifest.json").exists():
                write_json(
                    run.path / "manifest.json",
                    {"version": MANIFEST_VERSION, "name": name, "created": now(), "steps": []},
                )
            run._remove_leftovers()  # also fails early on a damaged manifest
            run._check_damage(force)
        except BaseException:
            run.unlock()
            raise
        return run

    def _freeze_recipe(self, recipe: Recipe, force: bool) -> None:
        frozen = self.path / "recipe.yaml"
        if frozen.exists():
            old = self.recipe()
            if recipe_digest(old) == recipe_digest(recipe):
                return
            if not force:
                raise InputError(
                    f"{self.path}: made by a different recipe ({_first_difference(old, recipe)}); "
                    "use another --name, or --force to continue it with the new recipe"
                )
            with disk_errors(self.path):
                shutil.copy2(frozen, self.path / f"recipe.{len(self.steps())}.yaml")  # keep the old one
        write_atomic(frozen, recipe_to_yaml(recipe))

    @classmethod
    def existing(cls, path: Path) -> RunDir:
        """A run directory to read (status, compare, --init-from); its manifest must be readable."""
        run = cls(Path(path))
        if not (run.path / "manifest.json").is_file() or not (run.path / "recipe.yaml").is_file():
            raise InputError(f"{run.path}: not a run directory (no manifest.json and recipe.yaml)")
        run.steps()
        return run

    def recipe(self) -> Recipe:
        import yaml

        path = self.path / "recipe.yaml"
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise InputError(f"{path}: damaged frozen recipe ({err})") from None
        return validate_recipe(tree, str(path))

    def _remove_leftovers(self) -> None:
        """The temporaries of killed writers, in the run's folder and its steps' (we hold the lock)."""
        remove_temporaries(self.path, recursive=False)
        for folder in {s.folder for s in self.steps()}:
            if (self.path / folder).is_dir():
                remove_temporaries(self.path / folder)

    # ------------------------------------------------------------ damage
    def damage(self) -> dict[str, str]:
        """Finished steps whose files are gone (deleted, or a partial copy): folder -> what is missing.
        `done` is trusted only with the files: the evaluations behind its scores, a bootstrap's
        traces, and the program state of init, p and w steps with the program and adapters it names."""
        found = {}
        for step in self.done_steps():
            problem = self._missing(step)
            if problem:
                found[step.folder] = problem
        return found

    def _missing(self, step: Step) -> str | None:
        folder = self.step_dir(step)
        needed = [folder / name for split in step.scores for name in eval_files(split)[:2]]
        if step.kind == StepKind.BOOTSTRAP:
            needed.append(folder / "traces.jsonl")
        if step.kind in STATE_KINDS:
            needed.append(folder / "state.json")
        for path in needed:
            if not path.is_file():
                return f"{path.relative_to(self.path)} is missing"
        return self._missing_from_state(folder / "state.json") if step.kind in STATE_KINDS else None

    def _missing_from_state(self, path: Path) -> str | None:
        """What a program state (state.py) names, its program.json and each adapter's files, and is not there."""
        try:
            data = json.loads(path.read_text())
            files = [data["program"]] if data.get("program") else []
            files += [
                f"{m['adapter']}/{name}" for m in data["modules"].values() if m.get("adapter") for name in ADAPTER_FILES
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{path.relative_to(self.path)} is damaged ({type(err).__name__})"
        return next((f"{f} is missing" for f in files if not (self.path / f).is_file()), None)

    def damage_error(self, damage: dict[str, str]) -> InputError:
        folder, problem = next(iter(damage.items()))
        more = f" (and {len(damage) - 1} more damaged step(s))" if len(damage) > 1 else ""
        return InputError(
            f"{self.path}: step {folder} is done but {problem}{more}; run the command again with "
            f"--force to redo {folder} and the steps after it, or use another --name"
        )

    def _check_damage(self, force: bool) -> None:
        """Refuse a run with damaged finished steps; with `force`, mark the first of them and every
        step after it (they were built on it) failed, so that they are redone."""
        damage = self.damage()
        if not damage:
            return
        if not force:
            raise self.damage_error(damage)
        steps = self.steps()
        first = next(s for s in steps if s.folder in damage)
        for s in steps:
            if s.status == "done" and s.index >= first.index:
                s.status = "failed"
                s.error = f"damaged: {damage.get(s.folder) or 'built on ' + first.folder}; redone (--force)"
        self._save_steps(steps)

    # ------------------------------------------------------------ lock
    def lock(self) -> None:
        """Hold `run.lock`, an flock: the kernel releases it when its holder dies, however it dies. So
        a lock left by a dead process is simply taken, a live holder's never, and of processes that
        race for a free lock exactly one gets it; no pid file is judged stale, nothing is deleted."""
        path = self.path / "run.lock"
        with disk_errors(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, fcntl.LOCK_EX, LOCK_GRACE_S):
            holder = _holder(fd)
            os.close(fd)
            raise InputError(f"{self.path}: in use by {holder}; wait for it or stop it")
        try:
            with disk_errors(path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} since {now()}".encode())
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder(self) -> str | None:
        """Who holds run.lock now ("pid N since T"), or None when no live process does."""
        try:
            fd = os.open(self.path / "run.lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            return None if _flock(fd, fcntl.LOCK_SH, 0) else _holder(fd)  # closing lets go of our look
        finally:
            os.close(fd)

    # ------------------------------------------------------------ manifest
    def manifest(self) -> dict:
        path = self.path / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise _damaged_manifest(path, f"{type(err).__name__}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise _damaged_manifest(path, "no list of steps")
        return data

    def steps(self) -> list[Step]:
        try:
            return [_parse_step(s) for s in self.manifest()["steps"]]
        except (TypeError, ValueError) as err:
            raise _damaged_manifest(self.path / "manifest.json", f"a step entry: {err}") from None

    def _save_steps(self, steps: list[Step]) -> None:
        data = self.manifest()
        data["steps"] = [s.__dict__ for s in steps]
        write_json(self.path / "manifest.json", data)

    def set_manifest_field(self, key: str, value: Any) -> None:
        data = self.manifest()
        data[key] = value
        write_json(self.path / "manifest.json", data)

    def done_steps(self) -> list[Step]:
        return [s for s in self.steps() if s.status == "done"]

    def begin(self, kind: str) -> Step:
        """Append a `running` step, replacing unfinished ones left by a killed process."""
        steps = [s for s in self.steps() if s.status == "done"]
        step = Step(index=(steps[-1].index + 1) if steps else 0, kind=kind)
        # Folders of unfinished steps are not trusted; the one this step reuses keeps its
        # contents only for a fine-tune's own checkpoints, which the trainer validates.
        for stale in {s.folder for s in self.steps()} - {s.folder for s in steps} - {step.folder}:
            shutil.rmtree(self.path / stale, ignore_errors=True)
        with disk_errors(self.step_dir(step)):
            self.step_dir(step).mkdir(parents=True, exist_ok=True)
        self._save_steps(steps + [step])
        return step

    def finish(self, step: Step, seconds: float) -> None:
        step.status, step.ended, step.seconds = "done", now(), round(seconds, 3)
        failpoint(f"finish/{step.kind}")
        self._replace(step)

    def fail(self, step: Step, error: str, seconds: float) -> None:
        step.status, step.ended, step.seconds, step.error = "failed", now(), round(seconds, 3), error
        self._replace(step)

    def update(self, step: Step) -> None:
        """Rewrite a step's entry (e.g. a test score added to a finished step)."""
        self._replace(step)

    def _replace(self, step: Step) -> None:
        self._save_steps([step if s.index == step.index else s for s in self.steps()])

    def step_dir(self, step: Step) -> Path:
        return self.path / step.folder

    def eval_failures(self, step: Step) -> dict[str, dict[str, int]]:
        """Per split the step evaluated: examples whose program or metric raised (`errors`; from its
        eval.json where the manifest does not say) and answers that did not parse (`parse_failures`)."""
        counts = {}
        for split in (split for split in ("dev", "test") if f"{split}_n" in step.info):
            errors = step.info.get(f"{split}_errors")
            if errors is None:  # an older run's manifest does not say; its eval.json does
                summary = self.step_dir(step) / eval_files(split)[0]
                errors = read_json(summary).get("errors", 0) if summary.is_file() else 0
            counts[split] = {"errors": int(errors), "parse_failures": int(step.info.get(f"{split}_parse_failures", 0))}
        return counts

    def adopt(self, donor: RunDir, steps: list[Step]) -> None:
        """Copy finished steps of another run in as this (empty) run's first steps: a sweep's
        `p -> w` starts from its sibling `p`'s folders instead of computing them again. Folders
        first, then the manifest, so a killed copy leaves an empty manifest and is redone."""
        for step in steps:
            copy_dir(donor.step_dir(step), self.step_dir(step))
        self._save_steps([Step(**{**s.__dict__, "info": {**s.info, "adopted_from": str(donor.path)}}) for s in steps])


def _flock(fd: int, mode: int, grace: float) -> bool:
    """Take an flock without blocking, retrying for `grace` seconds; False if another still holds it."""
    deadline = time.monotonic() + grace
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _holder(fd: int) -> str:
    """The holder as run.lock names it; when that pid is not running here, a process it started (or
    one on another machine sharing the folder) holds the lock, and the message says so."""
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    pid = re.match(r"pid (\d+)", text)
    if pid and not _running(int(pid[1])):
        return f"{text} (not running here: a process it started, or one on another machine, holds the lock)"
    return text or "another process"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _first_difference(a: Recipe, b: Recipe) -> str:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")

    def walk(x: Any, y: Any, path: str) -> str | None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                found = walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
                if found:
                    return found
            return None
        return None if x == y else f"{path}: {x!r} -> {y!r}"

    return walk(da, db, "") or "recipe changed"
