"""Export one step of a run for serving: its program, recipe and weights in a folder of their own.

    jointopt export sst2 --out exported/sst2                          # best step, PEFT adapters
    jointopt export runs/sst2 --step 02-w --format merged --out exported/sst2-merged
    vllm serve ... (the commands are in the export's README.md)

    manifest = export_step(Path("runs/sst2"), "best", "peft", Path("exported/sst2"))

What a step's program is, is the run's (state.py): its prompts (`program.json`) and, per module,
the model and the LoRA adapter it runs on. The export holds `program.json`, `recipe.yaml` (the
run's), `README.md` (how to serve it and point the recipe at the served models) and `export.json`
(run, step, base checkpoint per module, format), and the weights: `--format peft` copies each
adapter folder as it is to `adapters/<module>/` (PEFT's own format, which `PeftModel.from_pretrained`
and vLLM's `--lora-modules` load); `--format merged` writes a full transformers checkpoint per
fine-tuned module to `models/<module>/` (base + LoRA merged by PEFT, tokenizer and chat template
included). Modules without an adapter run on their base model. The folder is built next to `--out`
and renamed into place (`rundir.staged_dir`), so a killed export leaves no half of one; a non-empty
`--out` is replaced only with `force`. API keys are never written: the recipe names their
environment variables only.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .files import now, staged_dir, write_atomic, write_json
from .recipe import EMBEDDED_MODEL, LocalModel, Recipe
from .rundir import RunDir, Step, StepKind
from .weights.soft_prompt import SUBFOLDER

FORMATS = ("peft", "merged")
KEY_ENV = "VLLM_API_KEY"  # the served models' key, in the README's commands and overrides
FIRST_PORT = 8000


@dataclass
class Entry:
    """One module of the exported program: its model, base checkpoint and weights."""

    module: str
    model: str  # the recipe's model key
    base: str | None = None  # the local model's `path` (None: a LiteLLM model)
    checkpoint: Path | None = None  # the folder of `base` (resolve_checkpoint)
    adapter: Path | None = None  # the run's adapter folder
    name: str | None = None  # the exported adapter or merged model (shared adapters: exported once)
    served: str | None = None  # the model name a server gives it
    port: int | None = None


@dataclass
class Server:
    """One `vllm serve` of the README: a base or merged checkpoint, its LoRA adapters."""

    model: str
    served: str
    port: int
    loras: dict[str, str] = field(default_factory=dict)
    rank: int = 0


# ---------------------------------------------------------------- the step and its program
def find_step(run: RunDir, spec: str) -> Step:
    """The step `spec` names: `best` (as compare picks it: the manifest's best, else the best step so
    far by dev score or by the recipe's schedule.select), an index or a folder name like 02-w. It must
    be done."""
    from .compare import RunRecord

    steps = run.steps()
    if spec == "best":
        step = RunRecord.load(run.path).best
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


def step_state(run: RunDir, recipe: Recipe, step: Step):
    """The program state `step` ran (state.py: as of that step); bad input when it is the recipe's own
    program, or when a file it names is damaged."""
    from .program import build_program
    from .state import current_state

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
    return state


def _refuse_damaged(run: RunDir, step: Step, folder: str, damage: dict[str, str]) -> None:
    if folder in damage:
        raise InputError(f"{run.path}: step {step.folder} cannot be exported: {folder} is done but {damage[folder]}")


def plan_entries(run: RunDir, recipe: Recipe, state) -> list[Entry]:
    """One entry per module; an adapter shared by several modules is exported once, under the first's name."""
    from .weights.checkpoint import resolve_checkpoint

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


# ---------------------------------------------------------------- writing
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
    manifest = _manifest(run, step, fmt, entries, servers, recipe)
    with staged_dir(out) as tmp:
        _write_program(run, recipe, state, tmp / "program.json")
        shutil.copyfile(run.path / "recipe.yaml", tmp / "recipe.yaml")
        for entry in {e.name: e for e in entries if e.name}.values():
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
        from .program import build_program

        build_program(recipe).save(str(path))  # a fresh program: no LMs, no demos


def merge_adapter(checkpoint: Path, adapter: Path, out: Path) -> None:
    """A full transformers checkpoint of `checkpoint` with the LoRA `adapter` merged into its weights
    (PEFT's merge_and_unload, in the checkpoint's dtype), its tokenizer and chat template."""
    from peft import PeftModel

    from .weights.checkpoint import load_causal_lm, load_tokenizer

    base = load_causal_lm(checkpoint, "auto")
    merged = PeftModel.from_pretrained(base, str(adapter), local_files_only=True).merge_and_unload(safe_merge=True)
    merged.save_pretrained(out)
    load_tokenizer(checkpoint).save_pretrained(out)


# ---------------------------------------------------------------- serving: plan, manifest, README
def plan_servers(entries: list[Entry], fmt: str) -> list[Server]:
    """The vLLM servers of every local module: for peft one per base checkpoint, with its adapters;
    for merged one per merged model and one per base checkpoint a module still runs on. Sets each
    entry's served model name and port."""
    servers: dict[str, Server] = {}
    for e in entries:
        if e.checkpoint is None:  # a LiteLLM model: served already
            continue
        key, model, served = f"base:{e.checkpoint}", str(e.checkpoint), e.model  # model keys may share one
        if e.name and fmt == "merged":
            key, model, served = f"merged:{e.name}", f"models/{e.name}", e.name
        s = servers.setdefault(key, Server(model, served, FIRST_PORT + len(servers)))
        e.served, e.port = s.served, s.port
        if e.name and fmt == "peft":
            s.loras[e.name] = f"adapters/{e.name}"
            s.rank = max(s.rank, json.loads((e.adapter / "adapter_config.json").read_text()).get("r", 0))
            e.served = e.name
    return list(servers.values())


def served_overrides(recipe: Recipe, entries: list[Entry]) -> tuple[list[str], dict[str, str]]:
    """Recipe overrides that point each served module at its server, through a model `served_<module>`
    of its own (modules that share a model key may run different adapters); and each module's model
    key under them."""
    overrides, models = [], {}
    for e in entries:
        models[e.module] = e.model if e.served is None else f"served_{e.module}"
        if e.served is None:
            continue
        local = recipe.models[e.model]  # its generation settings go along
        spec = {
            "type": "litellm",
            "model": f"openai/{e.served}",
            "api_base": f"http://localhost:{e.port}/v1",
            "api_key_env": KEY_ENV,
            "max_tokens": local.max_tokens,
            "temperature": local.temperature,
        }
        overrides.append(f"models.{models[e.module]}={json.dumps(spec)}")
        if recipe.program.modules:
            overrides.append(f"program.modules.{e.module}.model={models[e.module]}")
    if overrides and not recipe.program.modules:  # predictor names may hold dots: the whole mapping
        overrides.append(f"program.models={json.dumps({**recipe.program.models, **models})}")
    return overrides, models


def _manifest(run: RunDir, step: Step, fmt: str, entries: list[Entry], servers: list[Server], recipe: Recipe) -> dict:
    """What export.json says: run, step, format, per module its model, base checkpoint and weights."""
    overrides, models = served_overrides(recipe, entries)
    modules = {}
    for e in entries:
        weights = f"{'adapters' if fmt == 'peft' else 'models'}/{e.name}" if e.name else "base model"
        modules[e.module] = {
            "model": e.model,
            "base": e.base,
            "checkpoint": str(e.checkpoint) if e.checkpoint else None,
            "weights": weights if e.checkpoint else f"litellm {recipe.models[e.model].model}",
            "adapter_from": str(e.adapter.relative_to(run.path)) if e.adapter else None,
            "served_as": e.served,
        }
    return {
        "format": fmt,
        "run": str(run.path.resolve()),
        "step": step.folder,
        "scores": step.scores,
        "exported": now(),
        "program": "program.json",
        "recipe": "recipe.yaml",
        "modules": modules,
        "serve": {"commands": [vllm_command(s) for s in servers], "overrides": overrides, "models": models},
    }


def vllm_command(s: Server) -> str:
    """The shell line that starts `s`; its token comes from the environment, never from a file."""
    args = ["vllm", "serve", s.model, "--served-model-name", s.served, "--port", str(s.port)]
    if s.loras:
        args += ["--enable-lora", "--max-loras", str(len(s.loras))]
        if s.rank > 16:  # vLLM's default is 16; above, it takes these
            args += ["--max-lora-rank", str(next((r for r in (32, 64, 128, 256, 512) if r >= s.rank), s.rank))]
        args += ["--lora-modules", *(f"{n}={p}" for n, p in s.loras.items())]
    return shlex.join(args) + f' --api-key "${KEY_ENV}"'


def render_readme(manifest: dict, entries: list[Entry], recipe: Recipe) -> str:
    """The export's README.md: what it holds, how to serve it, how to run the program on the servers."""
    scores = ", ".join(f"{k} {v:.3f}" for k, v in manifest["scores"].items()) or "no scores"
    lines = [
        f"# {recipe.name}: step {manifest['step']}, exported for serving ({manifest['format']})",
        "",
        f"Run `{manifest['run']}`, step `{manifest['step']}` ({scores}), exported {manifest['exported']}. "
        "`program.json` holds the prompts (DSPy's `program.save`), `recipe.yaml` the run's recipe, "
        "`export.json` all this as JSON.",
        "",
        "| module | model | base checkpoint | weights |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {v['model']} | {v['base'] or ''} | {v['weights']} |" for m, v in manifest["modules"].items()]
    if manifest["serve"]["commands"]:
        lines += [
            "",
            "## Serve",
            "",
            "With vLLM, from this folder (paths are relative to it):",
            "",
            "```bash",
            f"export {KEY_ENV}=choose-a-token",
            *manifest["serve"]["commands"],
            "```",
        ]
    lines += _serving_notes(entries, manifest["format"])
    if manifest["serve"]["overrides"]:
        lines += _client_section(manifest, recipe)
    return "\n".join(lines) + "\n"


def _serving_notes(entries: list[Entry], fmt: str) -> list[str]:
    notes = []
    for e in {e.name: e for e in entries if e.name and fmt == "merged"}.values():
        notes += [
            "",
            f"`models/{e.name}` is a plain transformers checkpoint; other servers take it too:",
            "",
            "```bash",
            f"text-generation-launcher --model-id models/{e.name} --port {e.port}   # TGI",
            f"python llama.cpp/convert_hf_to_gguf.py models/{e.name} --outfile {e.name}.gguf   # llama.cpp",
            f"llama-server -m {e.name}.gguf --port {e.port}",
            "```",
        ]
    served_base = [e for e in entries if e.base == EMBEDDED_MODEL and (fmt == "peft" or not e.name)]
    if served_base:  # a merged model holds its base already
        notes += [
            "",
            f"`{EMBEDDED_MODEL}` is jointopt's fp32 conversion of SmolLM2-135M-Instruct's Q4_1 GGUF, "
            f"in `{served_base[0].checkpoint}`: the run trained and evaluated on it, not on the Hub's "
            "HuggingFaceTB/SmolLM2-135M-Instruct. Serve that folder (copy it along to serve elsewhere).",
        ]
    if any(e.checkpoint for e in entries):
        notes += [
            "",
            "vLLM computes in 16 bits by default (`--dtype auto`: fp16 for an fp32 checkpoint): an "
            "answer may differ from the run's by rounding.",
        ]
    if any(e.checkpoint and not e.name for e in entries):
        notes += ["", "Modules whose weights say `base model` run on their base checkpoint as it is."]
    for e in {e.name: e for e in entries if e.name}.values():
        load = (
            f'AutoModelForCausalLM.from_pretrained("models/{e.name}")'
            if fmt == "merged"
            else f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{e.checkpoint}"), '
            f'"adapters/{e.name}")'
        )
        if (e.adapter / SUBFOLDER).is_dir():
            folder = f"{'models' if fmt == 'merged' else 'adapters'}/{e.name}/{SUBFOLDER}"
            merged = load if fmt == "merged" else f"{load}.merge_and_unload()"
            notes += [
                "",
                f"`{e.name}` has a soft prompt (an s step), in `{folder}`: a PEFT prompt-tuning folder. "
                "vLLM and TGI serve no soft prompts, so a server runs this module without it and may answer "
                f"otherwise than the run did. With it, in Python: `PeftModel.from_pretrained({merged}, "
                f'"{folder}")` (transformers and peft).',
            ]
        else:
            notes += [
                "",
                f"`{e.name}` in Python, without a server: `{load}` (transformers"
                f"{'' if fmt == 'merged' else ' and peft'}).",
            ]
    return notes


def _client_section(manifest: dict, recipe: Recipe) -> list[str]:
    """The overrides that point the recipe at the servers, and a script that runs the program there."""
    overrides, models = manifest["serve"]["overrides"], manifest["serve"]["models"]
    inputs = ", ".join(f'{name}="..."' for name in recipe.data.inputs)
    script = [
        "from jointcli.models import build_lm",
        "from jointcli.program import build_program, predictors_of",
        "from jointcli.recipe import load_recipe",
        "",
        f'recipe = load_recipe("recipe.yaml", {overrides!r})',
        "program = build_program(recipe)",
        'program.load("program.json")',
        f"for module, model in {models!r}.items():",
        "    for predictor in predictors_of(program, module):",
        "        predictor.lm = build_lm(model, recipe.models[model])",
        f"print(program({inputs}))",
    ]
    return [
        "",
        "## Point the recipe at the served models",
        "",
        "Recipe overrides (as any jointopt command takes them) that give each served module a LiteLLM model "
        f"of its own, `openai/<served name>` at its server; `{KEY_ENV}` holds the servers' token:",
        "",
        "```bash",
        *map(shlex.quote, overrides),
        "```",
        "",
        "The exported program on the servers, in Python (from this folder):",
        "",
        "```python",
        *script,
        "```",
    ]
