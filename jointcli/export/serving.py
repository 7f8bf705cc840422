"""How an export is served: one vLLM server per base checkpoint (peft) or per merged model, the
recipe overrides that point each module at its server, export.json and the export's README.md."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..files import now
from ..recipe import EMBEDDED_MODEL, Recipe
from ..rundir import RunDir, Step
from ..weights.adapter import SOFT_PROMPT_SUBFOLDER as SUBFOLDER

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


def export_manifest(
    run: RunDir, step: Step, fmt: str, entries: list[Entry], servers: list[Server], recipe: Recipe
) -> dict:
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
        lines += ["", "## Serve", "", "With vLLM, from this folder (paths are relative to it):", ""]
        lines += _fenced("bash", [f"export {KEY_ENV}=choose-a-token", *manifest["serve"]["commands"]])
    lines += _serving_notes(entries, manifest["format"])
    if manifest["serve"]["overrides"]:
        lines += _client_section(manifest, recipe)
    return "\n".join(lines) + "\n"


def _fenced(language: str, body: list[str]) -> list[str]:
    """`body` as a Markdown code block in `language`."""
    return [f"```{language}", *body, "```"]


def exported_entries(entries: list[Entry]) -> list[Entry]:
    """The entries whose weights the export holds, once per adapter (modules may share one)."""
    return list({e.name: e for e in entries if e.name}.values())


def _serving_notes(entries: list[Entry], fmt: str) -> list[str]:
    """The paragraphs after the serve commands: other servers of a merged model, where the embedded
    model comes from, vLLM's precision, modules on their base model, each exported module in Python."""
    notes = [line for e in exported_entries(entries) if fmt == "merged" for line in _other_servers(e)]
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
    for e in exported_entries(entries):
        notes += ["", _in_python(e, fmt)]
    return notes


def _other_servers(e: Entry) -> list[str]:
    """A merged model is a plain checkpoint: TGI and llama.cpp serve it too."""
    return ["", f"`models/{e.name}` is a plain transformers checkpoint; other servers take it too:", ""] + _fenced(
        "bash",
        [
            f"text-generation-launcher --model-id models/{e.name} --port {e.port}   # TGI",
            f"python llama.cpp/convert_hf_to_gguf.py models/{e.name} --outfile {e.name}.gguf   # llama.cpp",
            f"llama-server -m {e.name}.gguf --port {e.port}",
        ],
    )


def _in_python(e: Entry, fmt: str) -> str:
    """How to load an exported module in Python, without a server (with its soft prompt, if it has one)."""
    load = (
        f'AutoModelForCausalLM.from_pretrained("models/{e.name}")'
        if fmt == "merged"
        else f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{e.checkpoint}"), "adapters/{e.name}")'
    )
    if not (e.adapter / SUBFOLDER).is_dir():
        return (
            f"`{e.name}` in Python, without a server: `{load}` (transformers{'' if fmt == 'merged' else ' and peft'})."
        )
    folder = f"{'models' if fmt == 'merged' else 'adapters'}/{e.name}/{SUBFOLDER}"
    merged = load if fmt == "merged" else f"{load}.merge_and_unload()"
    return (
        f"`{e.name}` has a soft prompt (an s step), in `{folder}`: a PEFT prompt-tuning folder. "
        "vLLM and TGI serve no soft prompts, so a server runs this module without it and may answer "
        f'otherwise than the run did. With it, in Python: `PeftModel.from_pretrained({merged}, "{folder}")` '
        "(transformers and peft)."
    )


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
        *_fenced("bash", [shlex.quote(o) for o in overrides]),
        "",
        "The exported program on the servers, in Python (from this folder):",
        "",
        *_fenced("python", script),
    ]
