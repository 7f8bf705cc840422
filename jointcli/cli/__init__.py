"""The `jointopt` command line. Each command parses its arguments and calls library code.

    jointopt validate recipes/sst2.yaml data.split.train=16
    jointopt eval recipes/sst2.yaml data.split.dev=20 --name quick
    jointopt status runs/quick
    jointopt compare seq joint --require "joint > seq"
    jointopt export quick --format merged --out exported/quick

Exit codes, for every command: 0 success; 1 a step failed; 2 invalid input (recipe, flags, data,
run directory); 3 a compare gate failed; 130 interrupted. Set JOINTOPT_DEBUG=1 to see tracebacks.

app.py holds the Typer app and the options the commands share; recipes.py the commands that check,
plan and run a recipe; runs.py those that compare, sweep, show and export runs; main.py the entry
point, the one place that maps errors to exit codes. The commands import the library inside their
bodies, so that `jointopt --help` loads neither DSPy nor torch.
"""

# each command joins the app when its module loads, and --help lists them in that order
from . import init, recipes, runs  # noqa: F401
from .main import app, main

__all__ = ["app", "main"]
