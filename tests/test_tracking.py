"""MLflow tracking (jointcli/tracking/): what a real MLflow store holds equals what the manifests say,
in a local SQLite store and behind a real `mlflow server` on 127.0.0.1; a resume after a kill logs
into the same MLflow runs, never a finished step twice; a tracker that is down fails nothing.

The runs answer from a local stub chat server (tests/chat_server.py): no model loads, so this is the
fast tier, except the weight step's test, which trains a LoRA adapter for two optimizer steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from jointcli.failpoints import VARIABLE

from .chat_server import ChatServer
from .conftest import RECIPES, cli, manifest, run_cli, tiny

mlflow = pytest.importorskip("mlflow", reason="MLflow tracking is the jointopt[mlflow] extra (in dev)")
from mlflow.tracking import MlflowClient  # noqa: E402

SST2 = RECIPES / "sst2.yaml"
SERVER_START_S = 180  # a cold `mlflow server` on a busy 2-core machine: its imports and schema


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chat(monkeypatch):
    """A stub chat server and the overrides that run recipes/sst2.yaml on it in a second: 4 train,
    2 dev and 2 test examples, a 2-demo LabeledFewShot prompt step, its API key a secret."""
    secret = f"sk-jointopt-{uuid.uuid4().hex}"
    monkeypatch.setenv("MY_KEY", secret)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with ChatServer({"sentiment": "positive"}) as server:
        overrides = [
            *tiny(4, 2, 2),
            "runtime.cache=false",
            "program.modules.classify.model=remote",
            "optimizers.p.optimizer=LabeledFewShot",
            "optimizers.p.args={k: 2}",
            *server.model_overrides("remote", "MY_KEY"),
        ]
        yield overrides, secret


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A SQLite MLflow store for the tests that name one, each in an experiment of its own: a fresh
    store runs MLflow's schema migrations (seconds of writes), so the module creates it once, here."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-store')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(scope="module", autouse=True)
def _mlflow_server_starting(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (a free port), its store and artifacts in a temporary folder:
    started with the module, so that it boots while the first tests run; (url, process, log)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "art")]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # its gateway: no fetch of a price list
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", proc, folder / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the worker it started
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def mlflow_server(_mlflow_server_starting) -> str:
    """The URL of the module's `mlflow server`, once it answers /health."""
    url, proc, log = _mlflow_server_starting
    deadline = time.monotonic() + SERVER_START_S
    while not _healthy(url):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.3)
    return url


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


# ---------------------------------------------------------------- what MLflow holds
def children(client: MlflowClient, parent_id: str) -> dict[str, mlflow.entities.Run]:
    """The runs nested under `parent_id`, by name; a name twice fails (a step logged twice)."""
    parent = client.get_run(parent_id)
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    names = [r.info.run_name for r in found]
    assert len(names) == len(set(names)), f"logged twice: {sorted(names)}"
    return {r.info.run_name: r for r in found}


def expected_metrics(step: dict) -> dict[str, float]:
    """What the manifest says of a step, as the metrics of its MLflow run."""
    want = {split: score for split, score in step["scores"].items()}
    for split in step["scores"]:
        for name in ("n", "parse_failures", "errors", "majority"):
            want[f"{split}_{name}"] = step["info"][f"{split}_{name}"]
        want |= {f"{split}_answers.{label}": n for label, n in step["info"][f"{split}_answers"].items()}
    want |= {f"tokens_{k}": v for k, v in step["tokens"].items()}
    return want | {"seconds": step["seconds"]}


def assert_tracked(client: MlflowClient, run: Path, recipe: dict | None = None) -> dict:
    """The run's MLflow run and its nested step runs hold what its manifest says; returns the record."""
    m = manifest(run)
    record = m["mlflow"]
    held = client.get_run(record["run_id"])
    assert held.info.run_name == m["name"] and held.info.status == "FINISHED"
    assert {k: held.data.tags[k] for k in ("recipe", "strategy", "seed")} == {
        "recipe": "sst2",
        "strategy": (recipe or {}).get("strategy", held.data.tags["strategy"]),
        "seed": "0",
    }
    assert held.data.tags["commit"] and "cores" in held.data.tags["cpu"]
    assert held.data.tags["best"] == m["best"]
    steps = {f"{s['index']:02d}-{s['kind']}": s for s in m["steps"]}
    nested = children(client, record["run_id"])
    assert set(nested) == set(steps) == set(record["steps"])
    for folder, step in steps.items():
        run_of_step = nested[folder]
        assert run_of_step.info.run_id == record["steps"][folder]["run_id"]
        assert run_of_step.info.status == "FINISHED" and run_of_step.data.params["kind"] == step["kind"]
        assert run_of_step.data.metrics == pytest.approx(expected_metrics(step)), folder
        artifacts = {a.path for a in client.list_artifacts(run_of_step.info.run_id)}
        assert {"eval.json", "eval-test.json", "step.json"} <= artifacts
        if step["kind"] == "p":
            assert "program.json" in artifacts
            assert run_of_step.data.params["optimizer"] == "LabeledFewShot"
            assert run_of_step.data.params["optimizer_key"] == "p" and run_of_step.data.params["args.k"] == "2"
    assert "manifest.json" in {a.path for a in client.list_artifacts(record["run_id"])}
    return record


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# ---------------------------------------------------------------- the tests
def test_a_sweep_in_the_default_sqlite_store_is_what_the_manifests_say(chat, tmp_path):
    overrides, secret = chat
    runs = tmp_path / "runs"
    args = ["--strategies", "none, p", "--runs-dir", runs, "--track"]
    assert cli("sweep", SST2, *overrides, *args) == 0
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    sweep_id = json.loads((runs / "sst2-sweep" / "tracking.json").read_text())["mlflow"]["run_id"]
    sweep = client.get_run(sweep_id)
    assert sweep.info.run_name == "sst2-sweep" and sweep.info.status == "FINISHED"
    assert sweep.data.tags["strategies"] == "none, p" and sweep.data.metrics == {"failed_runs": 0}
    assert set(children(client, sweep_id)) == {"sst2-sweep/zero-shot/seed-0", "sst2-sweep/p/seed-0"}
    assert_tracked(client, runs / "sst2-sweep" / "zero-shot" / "seed-0", {"strategy": "none"})
    record = assert_tracked(client, runs / "sst2-sweep" / "p" / "seed-0", {"strategy": "p"})
    adopted = client.get_run(record["steps"]["00-baseline"]["run_id"])
    assert adopted.data.tags["adopted_from"].endswith("zero-shot/seed-0")  # a step of this run too
    assert client.get_experiment(sweep.info.experiment_id).name == "sst2"  # default: the recipe's name
    assert files_containing(runs, secret) == []  # the API key: neither in the store nor in the artifacts
    assert "tracking" not in (runs / "sst2-sweep" / "p" / "seed-0" / "recipe.yaml").read_text()

    # sweeping again: every run is finished, MLflow holds each step once, in the same runs
    assert cli("sweep", SST2, *overrides, *args) == 0
    assert manifest(runs / "sst2-sweep" / "p" / "seed-0")["mlflow"] == record
    assert_tracked(client, runs / "sst2-sweep" / "p" / "seed-0", {"strategy": "p"})
    # one strategy of it (as a task of the sweep on Ray runs): under the same sweep run, which it leaves as it is
    assert cli("sweep", SST2, *overrides, *args[:1], "p", *args[2:]) == 0
    shown = json.loads((runs / "sst2-sweep" / "tracking.json").read_text())["mlflow"]
    assert shown["run_id"] == sweep_id and shown["strategies"] == ["none", "p"]
    assert client.get_run(sweep_id).data.tags["strategies"] == "none, p"
    assert set(children(client, sweep_id)) == {"sst2-sweep/zero-shot/seed-0", "sst2-sweep/p/seed-0"}


def test_a_killed_run_resumes_into_the_same_mlflow_runs(chat, tmp_path, store):
    overrides, _ = chat
    runs = tmp_path / "runs"
    args = ["joint", SST2, *overrides, "schedule.strategy=p", "--runs-dir", runs]
    args += [f"tracking.mlflow.uri={store}", "tracking.mlflow.experiment=resumed"]
    killed = run_cli(*map(str, args), env={VARIABLE: "finish/p"})  # the p step's files written, not yet done
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = manifest(runs / "sst2")["mlflow"]
    assert list(before["steps"]) == ["00-baseline"]

    assert cli(*args) == 0  # the recipe's tracking section: no --track needed
    client = MlflowClient(store)
    record = assert_tracked(client, runs / "sst2", {"strategy": "p"})
    assert record["run_id"] == before["run_id"]
    assert record["steps"]["00-baseline"] == {**before["steps"]["00-baseline"], "scores": ["dev", "test"]}
    assert client.get_experiment(record["experiment_id"]).name == "resumed"

    # a damaged step redone with --force: a new step, a new nested run, the former one deleted
    (runs / "sst2" / "01-p" / "eval.json").unlink()
    assert cli(*args, "--force") == 0
    redone = assert_tracked(client, runs / "sst2", {"strategy": "p"})
    assert redone["steps"]["01-p"]["run_id"] != record["steps"]["01-p"]["run_id"]
    assert client.get_run(record["steps"]["01-p"]["run_id"]).info.lifecycle_stage == "deleted"


def test_step_commands_log_to_a_real_mlflow_server(chat, tmp_path, monkeypatch, capfd, mlflow_server):
    overrides, secret = chat
    runs = tmp_path / "runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # MLflow's own variables, honoured
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"served-{uuid.uuid4().hex[:8]}")
    common = [*overrides, "--runs-dir", runs, "--name", "steps", "--track"]
    assert cli("eval", SST2, *common) == 0
    assert cli("optimize-prompts", SST2, *common) == 0
    assert cli("eval", SST2, *common, "--split", "test") == 0
    m = manifest(runs / "steps")
    client = MlflowClient(mlflow_server)
    held = client.get_run(m["mlflow"]["run_id"])
    assert held.info.run_name == "steps" and held.info.status == "FINISHED"
    assert client.get_experiment(held.info.experiment_id).name == os.environ["MLFLOW_EXPERIMENT_NAME"]
    nested = children(client, held.info.run_id)
    assert list(nested) and set(nested) == {f"{s['index']:02d}-{s['kind']}" for s in m["steps"]}
    for step in m["steps"]:
        run_of_step = nested[f"{step['index']:02d}-{step['kind']}"]
        assert run_of_step.data.metrics == pytest.approx(expected_metrics(step))
    prompt = nested["01-p"]
    assert "program.json" in {a.path for a in client.list_artifacts(prompt.info.run_id)}
    program = json.loads(Path(client.download_artifacts(prompt.info.run_id, "program.json", str(tmp_path))).read_text())
    assert program == json.loads((runs / "steps" / "01-p" / "program.json").read_text())
    assert secret not in json.dumps([r.to_dictionary() for r in nested.values()])
    assert "View run" not in capfd.readouterr().out  # MLflow's own links stay off stdout, which carries results


def test_a_tracker_that_is_down_warns_once_and_fails_nothing(chat, tmp_path, capfd):
    overrides, _ = chat
    runs = tmp_path / "runs"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["--strategies", "none, p", "--runs-dir", runs, f"tracking.mlflow.uri={down}"]
    assert cli("sweep", SST2, *overrides, *args) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: MLflow tracking at {down} failed"), warnings
    assert warnings[0].endswith("the run goes on untracked")
    assert "mlflow" not in manifest(runs / "sst2-sweep" / "p" / "seed-0")
    assert manifest(runs / "sst2-sweep" / "p" / "seed-0")["finished"] is True


def test_tracking_settings_are_checked_and_kept_out_of_the_run(chat, tmp_path, capfd, monkeypatch):
    overrides, _ = chat
    runs = tmp_path / "runs"
    assert cli("validate", SST2, "tracking.mlflow.url=http://x") == 2
    assert "tracking.mlflow.url: unknown key; did you mean 'uri'?" in capfd.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as where the extra is not installed
    assert cli("eval", SST2, *overrides, "--runs-dir", runs, "--track") == 2
    assert "error: --track: MLflow is not installed; pip install 'jointopt[mlflow]'" in capfd.readouterr().err
    assert not runs.exists()


def test_tracking_off_imports_no_mlflow(chat, tmp_path):
    overrides, _ = chat
    code = (
        "import sys\nfrom jointcli.cli import main\nsys.argv = ['jointopt', *sys.argv[1:]]\n"
        "try:\n    main()\nfinally:\n    print('mlflow imported:', 'mlflow' in sys.modules)\n"
    )
    args = ["eval", str(SST2), *overrides, "--runs-dir", str(tmp_path / "runs")]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "mlflow imported: False"


@pytest.mark.model
def test_a_weight_step_logs_its_loss_and_learning_rate_per_optimizer_step(tmp_path, monkeypatch, store):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    runs = tmp_path / "runs"
    # 4 rows from the labels, 2 a step: two optimizer steps, then a dev and a test evaluation of 1 example
    train = ["optimizers.w.traces.source=labels", "optimizers.w.train.batch_size=2", "optimizers.w.train.epochs=1"]
    args = [*tiny(4, 1, 1), *train, "--runs-dir", runs, "--track", "tracking.adapters=true"]
    assert cli("finetune", SST2, *args, f"tracking.mlflow.uri={store}", "tracking.mlflow.experiment=weights") == 0
    m = manifest(runs / "sst2")
    client = MlflowClient(store)
    nested = children(client, m["mlflow"]["run_id"])
    step = next(s for s in m["steps"] if s["kind"] == "w")
    held = nested[f"{step['index']:02d}-w"]
    counts = step["info"]["traces"]  # run, passed, rows, parse_failures, errors (and per module, not logged)
    want = expected_metrics(step) | {f"traces.{k}": v for k, v in counts.items() if type(v) in (int, float)}
    want |= {name: held.data.metrics[name] for name in ("loss", "lr", "grad_norm")}  # the last steps': below
    assert held.data.metrics == pytest.approx(want)
    assert held.data.params["lora.r"] == "8" and held.data.params["optimizer_key"] == "w"
    rows = [
        json.loads(line)
        for line in (runs / "sst2" / f"{step['index']:02d}-w" / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2
    for metric, field in (("loss", "loss"), ("lr", "learning_rate")):
        history = client.get_metric_history(held.info.run_id, metric)
        assert [h.step for h in history] == [r["step"] for r in rows]
        assert [h.value for h in history] == pytest.approx([r[field] for r in rows])
    artifacts = {a.path for a in client.list_artifacts(held.info.run_id, "adapters")}
    assert artifacts and all(a.startswith("adapters/") for a in artifacts)
