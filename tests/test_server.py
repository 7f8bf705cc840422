"""Prompted modules on a server, offline.

A real OpenAI-compatible server: `transformers serve` runs the embedded model on 127.0.0.1, and the
two-module recipe puts `summarize` on it (a `type: litellm` model) while `classify` runs here and is
fine-tuned (`p -> w`). Then what a failing server does to a run: the stand-in of chat_server.py fails on
demand (refused connection, timeout, HTTP 500, wrong key); each is one line, the step failed, and the
same command resumes once the server is fixed. The failure tests load no model (the fast tier).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from jointcli.recipe import EMBEDDED_MODEL
from jointcli.weights.checkpoint import resolve_checkpoint

from .chat_server import ChatServer
from .conftest import RECIPES, cli, manifest, tiny

PIPELINE = RECIPES / "sst2-pipeline.yaml"
START_TIMEOUT_S = 120  # measured: 10 to 25 s on 2 busy cores, mostly imports; the weights load in 1 s
KEY_ENV = "SERVED_KEY"


@dataclass
class Served:
    name: str  # the model, as requests name it: the checkpoint's folder (the server runs next to it)
    api_base: str
    log: Path  # the server's stdout and stderr: uvicorn logs one line per request

    def requests(self) -> int:
        return sum(
            '"POST /v1/chat/completions HTTP/1.1" 200' in line
            for line in self.log.read_text(errors="replace").splitlines()
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    what = (
        f"exited with code {process.returncode}"
        if process.poll() is not None
        else f"did not answer {url} within {START_TIMEOUT_S} s"
    )
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    pytest.fail(f"transformers serve {what}; its output ends with:\n{tail}", pytrace=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    """`transformers serve` on the embedded model's checkpoint, fully offline, for this file's tests.
    It is pinned to the folder (a positional argument: loaded before the server answers) and runs in
    the folder's parent, so that requests name the model by the folder's name."""
    checkpoint = resolve_checkpoint(EMBEDDED_MODEL)  # converted once per machine
    port = _free_port()
    log = tmp_path_factory.mktemp("served") / "server.log"
    command = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        checkpoint.name,  # `transformers serve`
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            cwd=checkpoint.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        _wait_ready(process, f"http://127.0.0.1:{port}/health", log)
        yield Served(checkpoint.name, f"http://127.0.0.1:{port}/v1", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.model
def test_summarize_runs_on_the_server_and_classify_is_fine_tuned_here(served, runs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-checked-by-this-server")
    remote = f"openai/{served.name}"
    large = {
        "type": "litellm",
        "model": remote,
        "api_base": served.api_base,
        "api_key_env": KEY_ENV,
        "max_tokens": 8,
        "timeout": 60,
    }
    # classify answers in plain text here: every prediction is then recorded, with summarize's opinion
    # (a ChatAdapter answer that does not parse leaves an example without its prediction)
    args = tiny(
        2,
        3,
        2,
        f"models.large={json.dumps(large)}",
        "models.small.max_tokens=8",
        "program.modules.classify.adapter=text",
        "runtime.cache=false",  # every call reaches the server
        "optimizers.p.optimizer=LabeledFewShot",
        "optimizers.p.args={k: 1}",
        "optimizers.w.train.batch_size=2",
        "schedule.strategy=p -> w",
    )
    assert cli("joint", PIPELINE, *args, "--runs-dir", runs) == 0
    run = runs / "sst2-pipeline"
    assert manifest(run)["finished"] is True

    # summarize's opinions are the served model's words, one per sentence
    for step in ("00-baseline", "01-p", "02-w"):
        opinions = [row["prediction"]["opinion"] for row in _rows(run / step / "predictions.jsonl")]
        assert len(opinions) == 3 and all(o.strip() for o in opinions), opinions
        assert len(set(opinions)) > 1, opinions

    # every call of summarize reached the server: the evaluations' and the bootstrap's, no more
    evals = sorted(run.glob("*/eval*.json"))
    calls = sum(_json(path)["usage"][remote]["calls"] for path in evals)
    bootstrapped = _json(run / "02-w" / "traces.json")["modules"]["summarize"]["ran"]
    assert bootstrapped == 2 and served.requests() == calls + bootstrapped

    # tokens per step and per model; a model on a local server has no price
    for path in evals:
        result = _json(path)
        usage = result["usage"][remote]
        assert usage["calls"] == result["n"] and usage["tokens_in"] > 0 and usage["tokens_out"] > 0
        assert usage["cost_usd"] is None and result["cost_usd"] is None
        assert result["tokens_in"] == sum(u["tokens_in"] for u in result["usage"].values())
        assert any(model.startswith("local/small") for model in result["usage"])

    # the weight step trained classify only
    step = run / "02-w"
    modules = _json(step / "state.json")["modules"]
    assert modules["classify"]["adapter"] and modules["summarize"]["adapter"] is None
    assert {row["module"] for row in _rows(step / "traces.jsonl")} == {"classify"}
    (w,) = [s for s in manifest(run)["steps"] if s["kind"] == "w"]
    assert list(w["info"]["training"]) == ["classify"]


# ---------------------------------------------------------------- a server that fails
FIELDS = {"sentiment": "positive"}
RIGHT_KEY = "sk-right-key-4d1f"
WRONG_KEY = "sk-wrong-key-9b7e"


def _break(server: ChatServer, case: str, monkeypatch) -> ChatServer:
    if case == "refused":
        server.close()  # nothing listens on its port any more
    elif case == "timeout":
        server.delay = 3.0  # the recipe waits 0.5 s
    elif case == "http-500":
        server.status = 500
    elif case == "wrong-key":
        monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    return server


def _fix(server: ChatServer, case: str, monkeypatch) -> ChatServer:
    if case == "refused":  # a server comes back on the same port, serving the same model
        server = ChatServer(FIELDS, port=server.port, model=server.model).__enter__()
        server.key = RIGHT_KEY
    server.delay, server.status = 0.0, None
    monkeypatch.setenv(KEY_ENV, RIGHT_KEY)
    return server


CAUSES = {
    "refused": "the server did not answer (failed to connect to 127.0.0.1:",
    "timeout": "the server did not answer (read timed out waiting for headers: no bytes for 0.5s)",
    "http-500": "the server failed (HTTP 500",
    "wrong-key": "the server refused the API key (HTTP 401)",
}


@pytest.mark.parametrize("case", list(CAUSES))
def test_a_failing_server_fails_the_step_in_one_line_and_the_run_resumes(case, runs, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, RIGHT_KEY)
    server = ChatServer(FIELDS).__enter__()
    server.key = RIGHT_KEY
    try:
        # retries off and a short timeout, so that each failure shows at once
        args = [
            *tiny(4, 2, 2),
            "runtime.cache=false",
            "program.modules.classify.model=remote",
            *server.model_overrides("remote", KEY_ENV, timeout=0.5, num_retries=0),
            "schedule.strategy=p",
            "--runs-dir",
            runs,
        ]
        assert cli("eval", RECIPES / "sst2.yaml", *args) == 0  # the baseline, while the server works
        capfd.readouterr()

        server = _break(server, case, monkeypatch)
        assert cli("joint", RECIPES / "sst2.yaml", *args) == 1
        err = capfd.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert len(errors) == 1, err
        assert errors[0].startswith(f"error: model {server.model}: {CAUSES[case]}"), errors[0]
        assert "Traceback" not in err and RIGHT_KEY not in err and WRONG_KEY not in err
        assert "Incorrect API key" not in errors[0]  # what the server said about the key is left out
        baseline, failed = manifest(runs / "sst2")["steps"]
        assert [(s["kind"], s["status"]) for s in (baseline, failed)] == [("baseline", "done"), ("p", "failed")]
        assert failed["error"] == errors[0][len("error: ") :]

        server = _fix(server, case, monkeypatch)
        assert cli("joint", RECIPES / "sst2.yaml", *args) == 0  # the same command, resumed
        after = manifest(runs / "sst2")
        assert after["finished"] is True
        assert [s["status"] for s in after["steps"]] == ["done", "done"]
        assert after["steps"][0]["ended"] == baseline["ended"]  # kept, not run again
    finally:
        server.close()
    for path in runs.rglob("*"):
        if path.is_file():
            assert WRONG_KEY.encode() not in path.read_bytes() and RIGHT_KEY.encode() not in path.read_bytes()


def test_a_priced_model_records_what_its_calls_cost(runs, monkeypatch):
    """DSPy prices a hosted model's usage (LiteLLM's price table, bundled): eval.json's cost_usd. The
    stand-in answers as gpt-4o-mini would (10 tokens in, 8 out); a local server's model has no price."""
    monkeypatch.setenv(KEY_ENV, "stub")
    with ChatServer(FIELDS, model="openai/gpt-4o-mini") as server:
        args = [
            *tiny(4, 3, 2),
            "runtime.cache=false",
            "program.modules.classify.model=remote",
            *server.model_overrides("remote", KEY_ENV),
            "--runs-dir",
            runs,
        ]
        assert cli("eval", RECIPES / "sst2.yaml", *args) == 0
    result = _json(runs / "sst2" / "00-baseline" / "eval.json")
    usage = result["usage"]["openai/gpt-4o-mini"]
    assert usage["calls"] == 3 and usage["tokens_in"] == 30 and usage["tokens_out"] == 24
    assert usage["cost_usd"] > 0 and result["cost_usd"] == pytest.approx(usage["cost_usd"])
    rows = _rows(runs / "sst2" / "00-baseline" / "predictions.jsonl")
    assert sum(r["usage"]["openai/gpt-4o-mini"]["cost_usd"] for r in rows) == pytest.approx(usage["cost_usd"])


def test_bootstraps_end_at_a_server_failure_but_count_an_example_the_server_refused():
    """A bootstrap (collect_traces, as the weight step runs it) counts an example that raised as a
    failed one; a server that is down is no such example: it ends the bootstrap, as an evaluation.
    A request the server refuses as malformed (HTTP 400) stays that example's error."""
    import dspy

    from jointcli.errors import StepError
    from jointcli.steps.traces import collect_traces

    program = dspy.Predict("sentence -> sentiment")
    trainset = [dspy.Example(sentence=s, sentiment="positive").with_inputs("sentence") for s in ("good", "fine")]
    with ChatServer(FIELDS) as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="stub", num_retries=0, cache=False)
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
            server.status = 400
            traces = collect_traces(program, trainset, lambda *_: 1.0, ["self"], 1.0, num_threads=2)
            assert (traces.errors, traces.rows) == (2, [])
            server.close()
            refused = rf"^model {server.model}: the server did not answer \(failed to connect to 127.0.0.1:"
            with pytest.raises(StepError, match=refused):
                collect_traces(program, trainset, lambda *_: 1.0, ["self"], 1.0, num_threads=2)
