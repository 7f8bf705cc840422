"""The `jointopt` command line. Each command parses its arguments and calls library code.

    jointopt validate recipes/sst2.yaml data.split.train=16
    jointopt eval recipes/sst2.yaml data.split.dev=20 --name quick
    jointopt status runs/quick
    jointopt compare seq joint --require "joint > seq"
    jointopt export quick --format merged --out exported/quick

Exit codes, for every command: 0 success; 1 a step failed; 2 invalid input (recipe, flags, data,
run directory); 3 a compare gate failed; 130 interrupted. Set JOINTOPT_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from .console import console, quiet_libraries
from .errors import InputError, JointoptError
from .sweep import DEFAULT_STRATEGIES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Jointly optimize the prompts and the weights of DSPy programs.",
)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key.path=value overrides, e.g. data.split.train=16", show_default=False)
]
NameOpt = Annotated[str | None, typer.Option("--name", help="run name (default: the recipe's name)")]
RunsOpt = Annotated[Path, typer.Option("--runs-dir", envvar="JOINTOPT_RUNS", help="root of run directories")]
OptimizerOpt = Annotated[
    str | None, typer.Option("--optimizer", help="key under `optimizers` (default: the first of the right type)")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="continue a run directory made by a different recipe")]


def _recipe(path: Path, overrides: list[str] | None):
    from .recipe import load_recipe

    return load_recipe(path, overrides or [])


def _one_step(
    step,
    kind: str,
    recipe: Path,
    overrides: list[str] | None,
    name: str | None,
    runs_dir: Path,
    force: bool,
    optimizer: str | None,
) -> None:
    """A step command: its optimizer (--optimizer, or the recipe's first of `kind`) checked before the
    run directory opens (bad input leaves no run behind), `step(ctx, key)`, then the run's table."""
    from .checks import step_optimizer
    from .context import open_run
    from .recipe import PromptOptimizer, WeightOptimizer
    from .schedule import pick_optimizer

    r = _recipe(recipe, overrides)
    key = pick_optimizer(r, optimizer, kind)
    step_optimizer(r, key, PromptOptimizer if kind == "prompt" else WeightOptimizer)
    with open_run(recipe, overrides, name, runs_dir, force) as ctx:
        step(ctx, key)
        _print_steps(ctx.run)


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check a recipe (and its overrides) without running anything."""
    from .checks import check_recipe

    r = _recipe(recipe, overrides)
    check_recipe(r)
    console.print(
        f"[green]ok[/]: {recipe} ({r.name}: {len(r.program.modules) or 'class'} module(s), "
        f"{len(r.models)} model(s), strategy {r.schedule.strategy!r})"
    )


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: Overrides = None,
    probe: Annotated[
        bool | None,
        typer.Option(
            "--probe/--no-probe",
            help="time a few generations and a LoRA step here (default: when every module is local)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON to stdout")] = False,
) -> None:
    """What each step of the schedule will cost: LM calls, tokens, LoRA parameters, memory, seconds.

    jointopt plan recipes/sst2.yaml
    jointopt plan recipes/sst2.yaml schedule.strategy="w -> p" --no-probe --json
    """
    from .checks import check_recipe
    from .console import prints_to_stderr
    from .plan import build_plan, print_plan

    r = _recipe(recipe, overrides)
    check_recipe(r)
    with prints_to_stderr():
        result = build_plan(r, probe)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, console)


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editors)."""
    from .recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@app.command("eval")
def eval_(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    split: Annotated[str, typer.Option(help="dev or test")] = "dev",
    force: ForceOpt = False,
) -> None:
    """Evaluate the run's current program (the recipe's, before any step) on a split.

    jointopt eval recipes/sst2.yaml data.split.dev=20 --name quick
    """
    from .context import open_run
    from .steps.kinds import eval_step

    if split not in ("dev", "test"):
        raise InputError(f"--split: {split!r} is not dev or test")
    with open_run(recipe, overrides, name, runs_dir, force) as ctx:
        eval_step(ctx, split)
        _print_steps(ctx.run)


@app.command("optimize-prompts")
def optimize_prompts(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    optimizer: OptimizerOpt = None,
    force: ForceOpt = False,
) -> None:
    """A prompt step (NN-p): run the recipe's DSPy prompt optimizer on the current program.

    jointopt optimize-prompts recipes/sst2.yaml optimizers.p.optimizer=LabeledFewShot
    """
    from .steps.kinds import prompt_step

    _one_step(prompt_step, "prompt", recipe, overrides, name, runs_dir, force, optimizer)


@app.command()
def bootstrap(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    optimizer: OptimizerOpt = None,
    force: ForceOpt = False,
) -> None:
    """Record the passing traces of the current program (or teacher, or labels) on the training split.

    jointopt bootstrap recipes/sst2.yaml optimizers.w.traces.source=labels
    """
    from .steps.kinds import bootstrap_step

    _one_step(bootstrap_step, "weight", recipe, overrides, name, runs_dir, force, optimizer)


@app.command()
def finetune(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    optimizer: OptimizerOpt = None,
    force: ForceOpt = False,
    traces: Annotated[Path | None, typer.Option(help="traces.jsonl to train on (e.g. from another run)")] = None,
) -> None:
    """A weight step (NN-w): LoRA fine-tuning on the run's latest traces (bootstrapping first if none);
    NN-s with a simultaneous optimizer: a soft prompt trained with the LoRA adapter.

    jointopt finetune recipes/sst2.yaml optimizers.w.train.epochs=1
    jointopt finetune recipes/sst2.yaml --optimizer s
    """
    from .steps.kinds import weight_step

    _one_step(
        lambda ctx, key: weight_step(ctx, key, traces), "weight", recipe, overrides, name, runs_dir, force, optimizer
    )


@app.command()
def joint(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    force: ForceOpt = False,
    seeds: Annotated[str | None, typer.Option(help="run once per seed, e.g. 0,1,2 -> NAME/seed-0, ...")] = None,
    init_from: Annotated[
        Path | None, typer.Option("--init-from", help="start from another run's best program (prompts and adapters)")
    ] = None,
) -> None:
    """Run the recipe's schedule (e.g. p -> w -> p) end to end; run it again to resume.

    jointopt joint recipes/sst2.yaml
    jointopt joint recipes/sst2.yaml schedule.strategy="w -> p" --name sst2-wp --seeds 0,1,2
    """
    from .schedule import run_joint_seeds

    start = _run_path(init_from, runs_dir) if init_from is not None else None
    run_joint_seeds(recipe, overrides, name, runs_dir, force, seeds=seeds, init_from=start, after=_print_steps)


RequireOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--require",
        help="gate: 'A > B' (A significantly better on test) or 'A >= B' (not significantly worse); "
        "exit code 3 when it fails; repeatable",
    ),
]
MinScoreOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--min-score", help="gate: every run's test score >= X, or NAME=X for one run; exit code 3; repeatable"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the whole report as JSON to stdout")]
PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="write score-by-step and quality/cost plots to this PNG file")
]


@app.command()
def compare(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="run names (under the runs root) or paths; a folder of seed runs counts as one", show_default=False
        ),
    ],
    runs_dir: RunsOpt = Path("runs"),
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    require: RequireOpt = None,
    min_score: MinScoreOpt = None,
) -> None:
    """Runs side by side: test scores with 95% intervals, paired significance, the quality/cost front.

    jointopt compare seq joint
    jointopt compare seq joint --require "joint > seq" --min-score 0.8 --plot compare.png
    """
    from .compare import check_gate_syntax, load_group

    check_gate_syntax(require or [], min_score or [])
    _report([load_group(r, runs_dir) for r in runs], as_json, plot, require or [], min_score or [])


@app.command()
def sweep(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    force: ForceOpt = False,
    strategies: Annotated[
        str, typer.Option(help="comma-separated strategies; 'none' is zero-shot")
    ] = DEFAULT_STRATEGIES,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds (default: the recipe's)")] = None,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    require: RequireOpt = None,
    min_score: MinScoreOpt = None,
) -> None:
    """Run the recipe under each strategy and seed (resumably), then compare them.

    jointopt sweep recipes/sst2.yaml --seeds 0,1,2 \
        --strategies "none, p, w, p -> p, w -> w, p -> w, w -> p, p -> w -> p"
    makes runs/sst2-sweep/p-w-p/seed-0, ... (strategy folders: "p -> w" -> p-w)
    """
    from .compare import check_gate_syntax
    from .sweep import run_sweep

    check_gate_syntax(require or [], min_score or [])  # before the sweep runs, not after
    result = run_sweep(recipe, overrides, name, runs_dir, force, strategies=strategies, seeds=seeds)
    if error := result.failure():  # the report shows what the failed runs finished; no gates then
        _report(result.groups, as_json, plot, [], [])
        raise error
    _report(result.groups, as_json, plot, require or [], min_score or [])


def _report(groups, as_json: bool, plot: Path | None, require: list[str], min_score: list[str]) -> None:
    """Print (or --json) the comparison, write the plot, then apply the gates (exit code 3)."""
    from .compare import build_report, check_gates
    from .compare_render import plot_report, print_report, report_json

    report = build_report(groups)
    report.gates = check_gates(report, require, min_score)
    if as_json:
        print(report_json(report))
    else:
        print_report(report, console)
    if plot is not None:
        plot_report(report, groups, plot)
        console.print(f"plot: {plot}")
    if error := report.gates.error():
        raise error


@app.command()
def status(
    run: Annotated[Path, typer.Argument(help="run directory (or a name under the runs root)")],
    runs_dir: RunsOpt = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON to stdout")] = False,
) -> None:
    """Show the steps of a run: kind, status, scores, time, tokens; what is damaged (then exit code 2)."""
    from .rundir import RunDir

    path = _run_path(run, runs_dir)
    try:
        rd = RunDir.existing(path)
    except InputError:
        _print_folders(path)  # what the disk still has, when the manifest cannot say
        raise
    damage = rd.damage()
    if as_json:
        print(json.dumps({**rd.manifest(), **({"damaged": damage} if damage else {})}, indent=2))
    else:
        running = _running_step(rd)
        notes = {folder: "damaged" for folder in damage} | ({running[0]: running[1]} if running else {})
        _print_steps(rd, notes)
        if running:
            console.print(" ".join(running), highlight=False, soft_wrap=True)
    if damage:
        raise rd.damage_error(damage)


def _print_folders(path: Path) -> None:
    folders = sorted(p.name for p in path.glob("[0-9][0-9]*-*") if p.is_dir()) if path.is_dir() else []
    if folders:
        console.print(f"step folders in {path}: {', '.join(folders)}", highlight=False)


def _running_step(run) -> tuple[str, str, str] | None:
    """When the last step says `running`: its folder, whether a process still runs it, and why we think so."""
    steps = run.steps()
    if not steps or steps[-1].status != "running":
        return None
    holder = run.holder()
    if holder:
        return steps[-1].folder, "in progress", f"(run.lock is held by {holder})"
    return steps[-1].folder, "interrupted", "(no process holds run.lock); the same command resumes it"


def _run_path(run: Path, runs_dir: Path) -> Path:
    """A run given as a path, or as a name under the runs root."""
    return run if run.exists() or run.is_absolute() else runs_dir / run


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run directory (or a name under the runs root)")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="folder to write; replaced only with --force if it exists and is not empty",
            show_default=False,
        ),
    ],
    runs_dir: RunsOpt = Path("runs"),
    step: Annotated[str, typer.Option(help="best (by dev score), or a step's index or folder, e.g. 02-w")] = "best",
    format_: Annotated[
        str,
        typer.Option(
            "--format", help="peft: the LoRA adapters as they are; merged: a full checkpoint per fine-tuned module"
        ),
    ] = "peft",
    force: Annotated[bool, typer.Option("--force", help="replace --out if it is not empty")] = False,
) -> None:
    """Write a step's program, recipe and weights to a folder, with a README that says how to serve them.

    jointopt export sst2 --out exported/sst2
    jointopt export runs/sst2 --step 02-w --format merged --out exported/sst2-merged
    """
    from .export import export_step

    manifest = export_step(_run_path(run, runs_dir), step, format_, out, force)
    modules = ", ".join(f"{m}: {v['weights']}" for m, v in manifest["modules"].items())
    console.print(
        f"exported {manifest['step']} of {manifest['run']} to {out} ({manifest['format']}; {modules}); "
        f"how to serve it: {out / 'README.md'}",
        highlight=False,
        soft_wrap=True,
    )


def _print_steps(run, notes: dict[str, str] | None = None) -> None:
    """The steps table (`notes`: more to say of some steps, by folder); for label-like outputs, what
    each step answered on dev, the majority-class score of each split, and every warning an
    evaluation raised (answers.py)."""
    from rich.console import Console
    from rich.table import Table

    from .answers import format_answers

    out = console if console.is_terminal else Console(file=console.file, width=max(console.width, 160))
    best = run.manifest().get("best")
    steps = run.steps()
    labelled = any("dev_answers" in s.info for s in steps)
    table = Table(title=f"run {run.path}")
    columns = ("step", "status", "dev", "test", "seconds", "tokens in/out") + (("dev answers",) if labelled else ())
    for col in columns + ("note",):
        table.add_column(col, justify="right" if col in ("dev", "test", "seconds") else "left")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for s in steps:
        note = s.error or (
            f"{s.info.get('dev_parse_failures')} parse failures" if s.info.get("dev_parse_failures") else ""
        )
        if s.folder == best:
            note = ("best " + note).strip()
        note = "; ".join(n for n in (note, (notes or {}).get(s.folder)) if n)
        answers = (format_answers(s.info.get("dev_answers", {})),) if labelled else ()
        table.add_row(
            s.folder,
            s.status,
            fmt(s.scores.get("dev")),
            fmt(s.scores.get("test")),
            fmt(s.seconds),
            f"{s.tokens.get('in', 0)}/{s.tokens.get('out', 0)}",
            *answers,
            note,
        )
    out.print(table)
    if line := _selection_line(run):
        console.print(line, highlight=False, soft_wrap=True)
    for split in ("dev", "test"):
        share = next((s.info[f"{split}_majority"] for s in steps if f"{split}_majority" in s.info), None)
        if share is not None:
            console.print(f"majority class on {split}: {share:.3f} (the score of answering one label to everything)")
    for s in steps:
        if line := _traces_line(s.info.get("traces", {})):
            console.print(f"{s.folder} traces: {line}", highlight=False, soft_wrap=True)
    for s in steps:
        for split in ("dev", "test"):
            for warning in s.info.get(f"{split}_warnings", []):
                console.print(f"[yellow]warning[/]: {s.folder} {split}: {warning}", highlight=False, soft_wrap=True)


def _selection_line(run) -> str | None:
    """With a schedule.select rule: the rule and the step it chooses, in one line; a warning when it
    chose none (the best dev score is used)."""
    from .schedule import finished_steps
    from .selection import choose_step

    select = run.recipe().schedule.select
    chosen = choose_step(run.path, finished_steps(run), select) if select is not None else None
    if chosen is None:
        return None
    if chosen.fallback:
        return f"[yellow]warning[/]: schedule.select ({chosen.rule}): {chosen.fallback}"
    return f"best step by schedule.select ({chosen.rule}): {chosen.folder}"


def _traces_line(counts: dict) -> str:
    """A bootstrap's counts in one line: per module ran/parsed/passed (which module blocks a
    pipeline), then the rows per source."""
    if "modules" not in counts:
        return ""
    modules = "; ".join(
        f"{m} ran {c['ran']}, parsed {c['parsed']}, passed {c['passed']}" for m, c in counts["modules"].items()
    )
    sources = ", ".join(f"{k} {v}" for k, v in counts.get("per_source", {}).items()) or "none"
    return "; ".join(part for part in (f"{counts['run']} examples", modules, f"rows: {sources}") if part)


# The libraries whose deprecation notices main() hides (by the module a warning is attributed to):
# jointcli's own and a user's module (a metric, a program class) still show theirs.
LIBRARIES_NOTICES = (
    r"(dspy|litellm|openai|httpx|httpcore|aiohttp|pydantic|transformers|peft|accelerate|torch"
    r"|huggingface_hub|tokenizers|safetensors|gguf|numpy|scipy|sklearn|pandas|pyarrow|datasets"
    r"|matplotlib|optuna|tqdm|jinja2|diskcache|gepa)(\.|$)"
)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _app() -> int | None:
    """The command; a full disk or a read-only file system, wherever met, is bad input (rundir.disk_error).
    Writes into a run directory say so themselves, permissions included."""
    try:
        return app(standalone_mode=False)  # typer turns Ctrl-C into a returned 130
    except OSError as err:
        from .files import WRITE_ERRNOS, disk_error

        if err.errno not in WRITE_ERRNOS:
            raise
        raise disk_error(err) from err


def main() -> None:
    """Entry point: one place maps every error to an exit code and a one-line message."""
    from .weights.device import set_process_defaults

    set_process_defaults()  # OMP_WAIT_POLICY, offline hub: before any command imports torch
    quiet_libraries()
    debug = os.environ.get("JOINTOPT_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _interrupt)  # a CI runner's stop: as clean as Ctrl-C
    if not sys.stderr.isatty():
        # In a log, DSPy's tqdm bars are a flood of carriage returns; jointopt prints plain progress
        # lines instead (console.phase). tqdm reads this when it is first imported, which is later.
        os.environ.setdefault("TQDM_DISABLE", "1")
    if not debug:  # libraries' deprecation notices are for their callers' authors, not our users
        import warnings

        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES_NOTICES)
    try:
        code = _app()
        if isinstance(code, int) and code:
            if code == 130:
                console.print("interrupted")
            sys.exit(code)
    except JointoptError as err:
        if debug:
            console.print_exception()
        console.print(f"[red]error[/]: {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except ClickException as err:  # bad flags: click's usage message, exit code 2
        err.show()
        sys.exit(err.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:
        if debug:
            raise
        console.print(
            f"[red]error[/]: {type(err).__name__}: {err} (JOINTOPT_DEBUG=1 for a traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
