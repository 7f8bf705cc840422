"""`jointopt export`: a step's program, recipe and weights in a folder that serving tools load.

    .venv/bin/python -m pytest -q tests/test_export.py

On one tiny real run (a short LoRA step on the embedded model, fp32): the PEFT export loads with
plain `PeftModel.from_pretrained`, the merged one with plain `AutoModelForCausalLM.from_pretrained`,
and both give the greedy token ids of the run's own engine with that adapter, the merged logits those
of the PEFT model; the README's Python runs against an OpenAI-compatible server (tests/chat_server.py,
standing in for vLLM); no API key reaches the export. Bad input exits 2 in one line, before any
model loads (the fast tier).
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import pytest

from jointcli.program import build_program
from jointcli.recipe import load_recipe
from jointcli.rundir import RunDir
from jointcli.selection import best_step
from jointcli.state import ProgramState, save_state

from .chat_server import ChatServer
from .conftest import RECIPES, cli, tiny
from .test_bad_inputs import finished_runs
from .test_secrets import files_containing, pickled_files

KEY_ENV = "JOINTOPT_EXPORT_TEST_KEY"
SECRET = f"sk-export-{uuid.uuid4().hex}"
# a LiteLLM model no module runs on: its key is in the environment while the run and the export run
REMOTE = f"models.big={{type: litellm, model: openai/gpt-4o-mini, api_key_env: {KEY_ENV}}}"
# fp32 engine; one demo, then 4 gold rows and 2 optimizer steps; one dev sentence: 00-p, 01-w
TINY_PW = tiny(
    4,
    1,
    1,
    "models.small.dtype=float32",
    "optimizers.p.optimizer=LabeledFewShot",
    "optimizers.p.args={k: 1}",
    "optimizers.w.traces.source=labels",
    "optimizers.w.train.batch_size=2",
    REMOTE,
)
W = "01-w"
MESSAGES = [
    {"role": "system", "content": "Classify the sentiment of the movie-review sentence."},
    {"role": "user", "content": "Sentence: a gripping, funny and moving film.\nSentiment:"},
]
MAX_NEW = 16


# ---------------------------------------------------------------- bad input (no model)
def prompt_run(tmp: Path) -> None:
    """{tmp}/runs/p: a done prompt step 00-p (the recipe's program saved as its state), then a failed one."""
    recipe = load_recipe(RECIPES / "sst2.yaml")
    run = RunDir.open(tmp / "runs", "p", recipe)
    step = run.begin("p")
    program = build_program(recipe)
    save_state(run, run.step_dir(step), program, ProgramState.initial(recipe, program))
    run.finish(step, 1.0)
    run.fail(run.begin("p"), "boom", 1.0)
    run.unlock()


def damaged_run(tmp: Path) -> None:
    prompt_run(tmp)
    (tmp / "runs" / "p" / "00-p" / "program.json").unlink()


def full_out(tmp: Path) -> None:
    prompt_run(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("a user's file")


BAD = [
    ("run-missing", None, ["nowhere"], "error: {tmp}/runs/nowhere: not a run directory"),
    ("baseline", finished_runs, ["a"], "error: {tmp}/runs/a: step 00-baseline has no program of its own"),
    ("baseline-by-index", finished_runs, ["a", "--step", "0"], "step 00-baseline has no program of its own"),
    (
        "unknown-step",
        finished_runs,
        ["a", "--step", "07-w"],
        "error: --step '07-w': no such step in {tmp}/runs/a (best, or one of: 00-baseline)",
    ),
    ("failed-step", prompt_run, ["p", "--step", "01-p"], "error: --step '01-p': 01-p is failed; only done steps"),
    (
        "damaged-step",
        damaged_run,
        ["p", "--step", "00-p"],
        "error: {tmp}/runs/p: step 00-p cannot be exported: 00-p is done but 00-p/program.json is missing",
    ),
    (
        "out-not-empty",
        full_out,
        ["p", "--step", "00-p"],
        "error: --out {tmp}/out: exists and is not empty; choose another folder, or --force to replace it",
    ),
    (
        "out-holds-the-run",
        prompt_run,
        ["p", "--step", "00-p", "--force", "--out", "{tmp}"],
        "error: --out {tmp}: overlaps {tmp}/runs/p, which the export reads",
    ),
    ("format", prompt_run, ["p", "--format", "gguf"], "error: --format: 'gguf' is not peft or merged"),
]


@pytest.mark.parametrize("setup, args, expected", [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_input_exits_2_with_one_line(setup, args, expected, tmp_path, capsys):
    if setup is not None:
        setup(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    model_loaded_before = "transformers" in sys.modules

    code = cli("export", *argv, *out, "--runs-dir", tmp_path / "runs")

    err = capsys.readouterr().err
    assert (code, expected.replace("{tmp}", str(tmp_path)) in err) == (2, True), err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert model_loaded_before or "transformers" not in sys.modules, "a bad input loaded the model"
    if setup is full_out:  # nothing of the user's was touched
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- a real run, exported
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("export") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, SECRET)
        for command in ("optimize-prompts", "finetune"):
            assert cli(command, RECIPES / "sst2.yaml", *TINY_PW, "--runs-dir", runs, "--name", "tiny") == 0
    return runs / "tiny"


@pytest.fixture(scope="module")
def engine(run):
    """The run's own engine (fp32, as the recipe says) with the run's adapter."""
    from jointcli.inference.engine import get_engine
    from jointcli.recipe import EMBEDDED_MODEL

    engine = get_engine(EMBEDDED_MODEL, "float32", "cpu")
    engine.add_adapter("exported", run / W / "adapters" / "classify")
    return engine


def engine_ids(engine) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) of MESSAGES on the engine's adapter."""
    from dspy.lm15 import Config, Message, Request

    from jointcli.inference.batch_decoder import Job

    request = Request(
        model="local/small@exported",
        system=MESSAGES[0]["content"],
        messages=(Message.user(MESSAGES[1]["content"]),),
        config=Config(max_tokens=MAX_NEW),
    )
    job = Job(request, engine._prompt_ids(request), MAX_NEW, ())
    engine.decoder.submit(job).result()
    return job.prompt, job.new


def greedy(model, prompt: list[int]) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def logits(model, prompt: list[int]):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt])).logits[0]


def exported(run: Path, out: Path, *args: str) -> dict:
    """`jointopt export RUN --out OUT ARGS` with an API key in the environment; what export.json says."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, SECRET)
        assert cli("export", run, "--out", out, *args) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert files_containing(out, SECRET.encode()) == [] and pickled_files(out) == []
    assert (out / "recipe.yaml").read_bytes() == (run / "recipe.yaml").read_bytes()  # names KEY_ENV, no key
    assert (out / "program.json").read_bytes() == (run / manifest["step"] / "program.json").read_bytes()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the staged folder was renamed into place
    return manifest


@pytest.mark.model
def test_peft_export_serves_the_runs_answers(run, engine, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = exported(run, tmp_path / "peft", "--step", W)
    module = manifest["modules"]["classify"]
    assert (manifest["format"], manifest["step"], module["weights"]) == ("peft", W, "adapters/classify")
    assert module["base"] == "builtin:smollm2-135m-instruct" and module["checkpoint"] == str(engine.checkpoint)
    adapter = tmp_path / "peft" / "adapters" / "classify"
    assert (adapter / "adapter_model.safetensors").read_bytes() == (
        run / W / "adapters" / "classify" / "adapter_model.safetensors"
    ).read_bytes()
    readme = (tmp_path / "peft" / "README.md").read_text()
    assert "--enable-lora" in readme and "--lora-modules classify=adapters/classify" in readme
    assert f"exported {W}" in capsys.readouterr().err

    prompt, expected = engine_ids(engine)
    base = AutoModelForCausalLM.from_pretrained(module["checkpoint"], dtype=torch.float32)
    base_logits = logits(base, prompt)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert greedy(model, prompt) == expected
    peft_logits = logits(model, prompt)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model: the check has teeth

    # the README's program runs as written against an OpenAI-compatible server (vLLM's stand-in)
    overrides = manifest["serve"]["overrides"]
    assert (
        load_recipe(tmp_path / "peft" / "recipe.yaml", overrides).models["served_classify"].model == "openai/classify"
    )
    _readme_script_runs(tmp_path / "peft", readme)

    # again into the same folder: refused, then replaced with --force; the default step is the best by dev
    assert cli("export", run, "--out", tmp_path / "peft") == 2
    best = best_step([s for s in RunDir(run).done_steps() if "dev" in s.scores])
    assert exported(run, tmp_path / "peft", "--force")["step"] == best.folder


def _readme_script_runs(folder: Path, readme: str) -> None:
    (script,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    with ChatServer({"sentiment": "positive"}) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_API_KEY", "served-token")
        mp.chdir(folder)
        script = script.replace("http://localhost:8000/v1", server.api_base).replace("openai/classify", server.model)
        exec(compile(script, "README.md", "exec"), {})
    assert server.authorizations == ["Bearer served-token"]
    (demo,) = json.loads((folder / "program.json").read_text())["classify"]["demos"]
    assert json.dumps(demo["sentence"])[1:-1] in json.dumps(server.requests[0]["messages"])  # the exported prompts


@pytest.mark.model
def test_merged_export_equals_the_adapter(run, engine, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = exported(run, tmp_path / "merged", "--step", "1", "--format", "merged")  # 01-w by its index
    assert manifest["modules"]["classify"]["weights"] == "models/classify"
    folder = tmp_path / "merged" / "models" / "classify"
    assert not list(tmp_path.glob("merged/adapters"))
    readme = (tmp_path / "merged" / "README.md").read_text()
    assert "vllm serve models/classify" in readme and "convert_hf_to_gguf.py models/classify" in readme

    prompt, expected = engine_ids(engine)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # the chat template travelled with the weights
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert greedy(merged, prompt) == expected
    base = AutoModelForCausalLM.from_pretrained(manifest["modules"]["classify"]["checkpoint"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run / W / "adapters" / "classify")).eval()
    torch.testing.assert_close(logits(merged, prompt), logits(adapted, prompt), atol=1e-3, rtol=1e-4)


def test_one_server_per_base_and_a_model_per_served_module(tmp_path):
    """Two modules on two model keys of one checkpoint, one with a rank-32 adapter: one vLLM server
    serves both; the overrides give each module its own LiteLLM model there, and they validate."""
    from jointcli.export import Entry, plan_servers, served_overrides, vllm_command

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 32}')
    checkpoint = tmp_path / "base"
    entries = [
        Entry("summarize", "large", "builtin:x", checkpoint),
        Entry("classify", "small", "builtin:x", checkpoint, tmp_path / "a", "classify"),
    ]
    (server,) = plan_servers(entries, "peft")
    assert vllm_command(server) == (
        f"vllm serve {checkpoint} --served-model-name large --port 8000 --enable-lora "
        "--max-loras 1 --max-lora-rank 32 --lora-modules classify=adapters/classify "
        '--api-key "$VLLM_API_KEY"'
    )
    recipe = load_recipe(RECIPES / "sst2-pipeline.yaml")
    overrides, models = served_overrides(recipe, entries)
    served = load_recipe(RECIPES / "sst2-pipeline.yaml", overrides)
    assert [m.model for m in served.program.modules] == ["served_summarize", "served_classify"] == list(models.values())
    assert [served.models[k].model for k in models.values()] == ["openai/large", "openai/classify"]
    assert served.models["served_classify"].max_tokens == recipe.models["small"].max_tokens  # settings go along

    merged = plan_servers([Entry(**{**vars(e), "served": None, "port": None}) for e in entries], "merged")
    assert [(s.model, s.served, s.port) for s in merged] == [
        (str(checkpoint), "large", 8000),
        ("models/classify", "classify", 8001),
    ]
