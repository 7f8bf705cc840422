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
and renamed into place (`files.staged_dir`), so a killed export leaves no half of one; a non-empty
`--out` is replaced only with `force`. API keys are never written: the recipe names their
environment variables only.

step.py finds the step and writes the folder; serving.py plans the servers and writes the README.
"""

from .serving import Entry, Server, plan_servers, render_readme, served_overrides, vllm_command
from .step import FORMATS, export_step, find_step, merge_adapter, plan_entries, step_state

__all__ = [
    "FORMATS",
    "Entry",
    "Server",
    "export_step",
    "find_step",
    "merge_adapter",
    "plan_entries",
    "plan_servers",
    "render_readme",
    "served_overrides",
    "step_state",
    "vllm_command",
]
