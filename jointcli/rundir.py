"""The run directory: the only code that writes into `runs/NAME/`.

    runs/sst2/
      recipe.yaml          the resolved recipe, frozen at the first command
      manifest.json        one entry per step; rewritten atomically after every change
      run.lock             held while a process writes here
      00-baseline/         eval.json, predictions.jsonl
      01-p/                program.json, state.json, eval.json, predictions.jsonl
      02-w/                traces.jsonl, adapters/<module>/, train_log.jsonl, ...

Every file is written to a temporary name in the same folder, flushed, then renamed over its
target, so a killed process leaves either the old file or the new one, never half of one. A
step's entry says `done` only after all its files are in place: a resume trusts `done` steps
and starts any other step over.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError
from .recipe import Recipe, recipe_to_yaml, validate_recipe

MANIFEST_VERSION = 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files private; these are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def atomic_target(path: Path):
    """Yield a temporary path (same folder, same suffix) that becomes `path` only on success;
    for writers that take a path, like `program.save` or `save_pretrained`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst` (same file system), replacing whatever is at `dst`. `dst` is never
    half-written: the old one is renamed aside first, then `src` renamed into place (put back on
    failure). Between the two renames `dst` is briefly absent."""
    if not dst.exists():
        os.replace(src, dst)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, trash / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(trash / dst.name, dst)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def staged_dir(dst: Path):
    """Yield a new empty folder next to `dst` (`.NAME.tmp-*`, ordinary permissions) to fill; on
    success it replaces `dst` (`replace_dir`), on failure it is removed. For writers of a whole
    folder that may be killed midway (an adapter, a converted model)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the folder is an ordinary one
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_staged(dst: Path) -> None:
    """Remove the `staged_dir` folders of `dst` left by killed writers; only while holding a lock
    that keeps every other writer of `dst` out."""
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: damaged or unreadable ({err.__class__.__name__}: {err})") from None


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: damaged or unreadable ({err.__class__.__name__}: {err})") from None


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()[:16]


class StepKind(StrEnum):
    """What a step did. The values are written into manifest.json and into folder names (02-w)."""

    INIT = "init"  # another run's best program copied in (joint --init-from)
    BASELINE = "baseline"  # the first evaluation, of the recipe's program
    EVAL = "eval"  # a later evaluation
    PROMPT = "p"  # a prompt optimizer
    WEIGHT = "w"  # LoRA fine-tuning
    BOOTSTRAP = "bootstrap"  # traces recorded for a weight step


@dataclass
class Step:
    """One entry of the manifest."""

    index: int
    kind: str  # a StepKind value: init | baseline | eval | p | w | bootstrap
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


class RunDir:
    """A run directory: frozen recipe, manifest, step folders and a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: Path, name: str, recipe: Recipe, force: bool = False) -> "RunDir":
        """Create `root/name` for `recipe`, or reopen it if it was made by the same recipe."""
        run = cls(Path(root) / name)
        if run.path.exists() and not run.path.is_dir():
            raise InputError(f"{run.path}: exists and is not a run directory")
        run.path.mkdir(parents=True, exist_ok=True)
        run.lock()
        frozen = run.path / "recipe.yaml"
        if frozen.exists():
            old = run.recipe()
            if recipe_digest(old) != recipe_digest(recipe):
                if not force:
                    run.unlock()
                    raise InputError(f"{run.path}: made by a different recipe ({_first_difference(old, recipe)}); "
                                     "use another --name, or --force to continue it with the new recipe")
                shutil.copy2(frozen, run.path / f"recipe.{len(run.steps())}.yaml")  # keep the old one
                write_atomic(frozen, recipe_to_yaml(recipe))
        else:
            write_atomic(frozen, recipe_to_yaml(recipe))
        if not (run.path / "manifest.json").exists():
            write_json(run.path / "manifest.json", {"version": MANIFEST_VERSION, "name": name,
                                                    "created": now(), "steps": []})
        run.steps()  # fail early on a damaged manifest
        return run

    @classmethod
    def existing(cls, path: Path) -> "RunDir":
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

    # ------------------------------------------------------------ lock
    def lock(self) -> None:
        """Hold `run.lock` (an flock, released by the kernel if the process dies)."""
        path = self.path / "run.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InputError(f"{self.path}: in use by {holder}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {now()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------ manifest
    def manifest(self) -> dict:
        data = read_json(self.path / "manifest.json")
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise InputError(f"{self.path / 'manifest.json'}: damaged (no list of steps)")
        return data

    def steps(self) -> list[Step]:
        try:
            return [Step(**s) for s in self.manifest()["steps"]]
        except TypeError as err:
            raise InputError(f"{self.path / 'manifest.json'}: damaged step entry ({err})") from None

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
        self.step_dir(step).mkdir(parents=True, exist_ok=True)
        self._save_steps(steps + [step])
        return step

    def finish(self, step: Step, seconds: float) -> None:
        step.status, step.ended, step.seconds = "done", now(), round(seconds, 3)
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

    def adopt(self, donor: "RunDir", steps: list[Step]) -> None:
        """Copy finished steps of another run in as this (empty) run's first steps: a sweep's
        `p -> w` starts from its sibling `p`'s folders instead of computing them again. Folders
        first, then the manifest, so a killed copy leaves an empty manifest and is redone."""
        for step in steps:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
            shutil.copytree(donor.step_dir(step), self.step_dir(step))
        self._save_steps([Step(**{**s.__dict__, "info": {**s.info, "adopted_from": str(donor.path)}})
                          for s in steps])


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
