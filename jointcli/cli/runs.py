"""The commands on runs: compare and sweep (which makes its runs first) print a comparison and apply
its gates; status shows a run's steps; export writes a step out for serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..console import console
from ..errors import InputError
from ..strategy import DEFAULT_STRATEGIES
from .app import (
    ForceOpt,
    JsonOpt,
    MinScoreOpt,
    NameOpt,
    Overrides,
    PlotOpt,
    RecipeArg,
    RequireOpt,
    RunArg,
    RunsOpt,
    TrackOpt,
    app,
    run_path,
    seed_list,
    tracked,
)

StrategiesOpt = Annotated[str, typer.Option(help="comma-separated strategies; 'none' is zero-shot")]
SeedsOpt = Annotated[str | None, typer.Option(callback=seed_list, help="comma-separated seeds (default: the recipe's)")]
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="run the runs in parallel on Ray (pip install 'jointopt\\[ray]'): a local Ray started for the "
        "sweep, or the cluster at --ray-address (or $RAY_ADDRESS), the runs root on shared storage",
    ),
]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", envvar="RAY_ADDRESS", help="with --ray: the cluster to run on")
]
DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", help="print each run's command and the run it waits for (--json: as JSON); run nothing"),
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
    from ..compare import check_gate_syntax, load_group

    check_gate_syntax(require or [], min_score or [])
    _report([load_group(r, runs_dir) for r in runs], as_json, plot, require or [], min_score or [])


@app.command()
def sweep(
    recipe: RecipeArg,
    overrides: Overrides = None,
    name: NameOpt = None,
    runs_dir: RunsOpt = Path("runs"),
    force: ForceOpt = False,
    strategies: StrategiesOpt = DEFAULT_STRATEGIES,
    seeds: SeedsOpt = None,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    require: RequireOpt = None,
    min_score: MinScoreOpt = None,
    track: TrackOpt = False,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Run the recipe under each strategy and seed (resumably), then compare them.

    jointopt sweep recipes/sst2.yaml --seeds 0,1,2 \
        --strategies "none, p, w, p -> p, w -> w, p -> w, w -> p, p -> w -> p"
    makes runs/sst2-sweep/p-w-p/seed-0, ... (strategy folders: "p -> w" -> p-w)
    """
    from ..compare import check_gate_syntax
    from ..sweep import plan_sweep, run_sweep
    from ..sweep_graph import dry_run as print_tasks

    check_gate_syntax(require or [], min_score or [])  # before the sweep runs, not after
    overrides = tracked(recipe, overrides, track)
    if dry_run:
        tasks = plan_sweep(recipe, overrides, name, strategies, seeds)[2]
        print(print_tasks(tasks, recipe, overrides, runs_dir, as_json))
        return
    on_ray = (ray_address or "local") if ray else None
    result = run_sweep(recipe, overrides, name, runs_dir, force, strategies=strategies, seeds=seeds, ray=on_ray)
    if error := result.failure():  # the report shows what the failed runs finished; no gates then
        _report(result.groups, as_json, plot, [], [])
        raise error
    _report(result.groups, as_json, plot, require or [], min_score or [])


def _report(groups, as_json: bool, plot: Path | None, require: list[str], min_score: list[str]) -> None:
    """Print (or --json) the comparison, write the plot, then apply the gates (exit code 3)."""
    from ..compare import build_report, check_gates
    from ..compare.render import plot_report, report_json
    from ..tables import print_report

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
    run: RunArg,
    runs_dir: RunsOpt = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON to stdout")] = False,
) -> None:
    """Show the steps of a run: kind, status, scores, time, tokens; what is damaged (then exit code 2)."""
    from ..rundir import RunDir
    from ..tables import print_steps

    path = run_path(run, runs_dir)
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
        print_steps(rd, notes)
        if running:
            console.print(" ".join(running), highlight=False)
    if damage:
        raise rd.damage_error(damage)


def _print_folders(path: Path) -> None:
    """The step folders on disk at `path`, for a run whose manifest cannot be read."""
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


@app.command()
def export(
    run: RunArg,
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
    from ..export import export_step

    manifest = export_step(run_path(run, runs_dir), step, format_, out, force)
    modules = ", ".join(f"{m}: {v['weights']}" for m, v in manifest["modules"].items())
    console.print(
        f"exported {manifest['step']} of {manifest['run']} to {out} ({manifest['format']}; {modules}); "
        f"how to serve it: {out / 'README.md'}",
        highlight=False,
    )
