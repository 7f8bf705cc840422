"""The step to export, the program state it ran, and the folder written: program.json, recipe.yaml,
the weights (PEFT adapter folders, or checkpoints merged by PEFT), README.md and export.json.

A KNNFewShot step is refused: its program looks up its demos per call among the run's training
examples, embedded by the run's local model (steps/knn.py), which a served program.json cannot do."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from ..files import staged_dir, write_atomic, write_json
from ..program import build_program
from ..recipe import LocalModel, Recipe
from ..rundir import RunDir, Step
from ..selection import shipped_step
from ..state import ProgramState, current_state
from ..step_kinds import StepKind
from ..weights.adapter import SOFT_PROMPT_SUBFOLDER as SUBFOLDER
from ..weights.checkpoint import load_causal_lm, load_tokenizer, resolve_checkpoint
from .serving import Entry, export_manifest, exported_entries, plan_servers, render_readme

FORMATS = ("peft", "merged")


def find_step(run: RunDir, spec: str) -> Step:
    """The step `spec` names: `best` (the step the run ships, selection.shipped_step: the manifest's
    best, else the best step so far by dev score or by the recipe's schedule.select), an index or a
    folder name like 02-w. It must be done."""
    steps = run.steps()
    if spec == "best":
        step = shipped_step(run)
        if step is None:
            raise InputError(f"{run.path}: no step has a dev score yet; name one with --step ({_names(steps)})")
        return step
    found = [s for s in steps if s.folder == spec or (spec.isdigit() and s.index == int(spec))]
    if not found:
        raise InputError(f"--step {spec!r}: no such step in {run.path} (best, or one of: {_names(steps)})")
    if found[-1].status != "done":
        raise InputError(f"--step {spec!r}: {found[-1].folder} is {found[-1].status}; only done steps are exported")
    return found[-1]


def _names(steps: list[Step]) -> str:
    return ", ".join(s.folder for s in steps) or "none"


def step_state(run: RunDir, recipe: Recipe, step: Step) -> ProgramState:
    """The program state `step` ran (state.py: as of that step); bad input when it is the recipe's own
    program, or when a file it names is damaged."""
    if step.kind == StepKind.BOOTSTRAP:
        raise InputError(f"{run.path}: step {step.folder} records traces, not a program; export a p, w or init step")
    damage = run.damage()
    _refuse_damaged(run, step, step.folder, damage)
    state = current_state(run, recipe, build_program(recipe), upto=step.index)
    if state.program_file is None and not any(m.adapter for m in state.modules.values()):
        raise InputError(
            f"{run.path}: step {step.folder} has no program of its own (the recipe's: no optimized "
            "prompts or weights); export a p, w or init step"
        )
    for file in [state.program_file] + [m.adapter for m in state.modules.values()]:
        if file:  # the steps whose files make this program: an adapter may come from an earlier step
            _refuse_damaged(run, step, Path(file).parts[0], damage)
    if state.knn:
        raise InputError(
            f"{run.path}: step {step.folder} picks its demos per call from the nearest training examples "
            "(KNNFewShot), which program.json cannot hold; export a step without KNNFewShot"
        )
    return state


def _refuse_damaged(run: RunDir, step: Step, folder: str, damage: dict[str, str]) -> None:
    if folder in damage:
        raise InputError(f"{run.path}: step {step.folder} cannot be exported: {folder} is done but {damage[folder]}")


def plan_entries(run: RunDir, recipe: Recipe, state) -> list[Entry]:
    """One entry per module; an adapter shared by several modules is exported once, under the first's name."""
    entries, names = [], {}
    for module, ms in state.modules.items():
        spec = recipe.models.get(ms.model)
        if spec is None:
            raise InputError(
                f"{run.path}: module {module} runs on model {ms.model!r}, which the run's recipe "
                "no longer has (changed with --force?)"
            )
        entry = Entry(module, ms.model)
        if isinstance(spec, LocalModel):
            entry.base, entry.checkpoint = spec.path, resolve_checkpoint(spec.path)
        if ms.adapter:
            entry.adapter = run.path / ms.adapter
            entry.name = names.setdefault(ms.adapter, module)
        entries.append(entry)
    return entries


def export_step(run_path: Path, step_spec: str, fmt: str, out: Path, force: bool = False) -> dict:
    """Export the step `step_spec` of the run at `run_path` into `out` (see the module docstring);
    returns what export.json says."""
    if fmt not in FORMATS:
        raise InputError(f"--format: {fmt!r} is not {' or '.join(FORMATS)}")
    run = RunDir.existing(run_path)
    recipe = run.recipe()
    step = find_step(run, step_spec)
    state = step_state(run, recipe, step)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: exists and is not empty; choose another folder, or --force to replace it")
    entries = plan_entries(run, recipe, state)
    _check_apart(out, [run.path] + [e.checkpoint for e in entries if e.checkpoint])
    servers = plan_servers(entries, fmt)
    manifest = export_manifest(run, step, fmt, entries, servers, recipe)
    with staged_dir(out) as tmp:
        _write_program(run, recipe, state, tmp / "program.json")
        shutil.copyfile(run.path / "recipe.yaml", tmp / "recipe.yaml")
        for entry in exported_entries(entries):
            if fmt == "peft":
                shutil.copytree(entry.adapter, tmp / "adapters" / entry.name, copy_function=shutil.copyfile)
            else:
                merge_adapter(entry.checkpoint, entry.adapter, tmp / "models" / entry.name)
                if (entry.adapter / SUBFOLDER).is_dir():  # an s step's soft prompt stays a PEFT folder
                    shutil.copytree(
                        entry.adapter / SUBFOLDER,
                        tmp / "models" / entry.name / SUBFOLDER,
                        copy_function=shutil.copyfile,
                    )
        write_atomic(tmp / "README.md", render_readme(manifest, entries, recipe))
        write_json(tmp / "export.json", manifest)
    return manifest


def _check_apart(out: Path, kept: list[Path]) -> None:
    """`out` is replaced whole: it must neither hold nor lie inside what the export reads."""
    target = out.resolve()
    for path in kept:
        p = Path(path).resolve()
        if target == p or target in p.parents or p in target.parents:
            raise InputError(f"--out {out}: overlaps {path}, which the export reads; choose a folder outside it")


def _write_program(run: RunDir, recipe: Recipe, state, path: Path) -> None:
    """The step's program.json; a state without one (an init step of adapters only) has the recipe's."""
    if state.program_file:
        shutil.copyfile(run.path / state.program_file, path)
    else:
        build_program(recipe).save(str(path))  # a fresh program: no LMs, no demos


def merge_adapter(checkpoint: Path, adapter: Path, out: Path) -> None:
    """A full transformers checkpoint of `checkpoint` with the LoRA `adapter` merged into its weights
    (PEFT's merge_and_unload, in the checkpoint's dtype), its tokenizer and chat template."""
    from peft import PeftModel  # peft and torch: only for --format merged

    base = load_causal_lm(checkpoint, "auto")
    merged = PeftModel.from_pretrained(base, str(adapter), local_files_only=True).merge_and_unload(safe_merge=True)
    merged.save_pretrained(out)
    load_tokenizer(checkpoint).save_pretrained(out)
