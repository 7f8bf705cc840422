"""Secrets and safety: an API key named by a recipe is used and written nowhere; saved state is
JSON/YAML/safetensors, never pickle; loading a run directory runs none of its files.

The key test runs real commands against a real local HTTP server (tests/chat_server.py) that
records the Authorization header; no model loads, so this is the fast tier."""

from __future__ import annotations

import ast
import json
import uuid
import zipfile
from pathlib import Path

from .chat_server import ChatServer
from .conftest import RECIPES, ROOT, cli, tiny

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib"}


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _is_pickle(path: Path) -> bool:
    """A pickle stream (protocol 2+ opens with 0x80 and the protocol) or torch.save's zip of one."""
    head = path.read_bytes()[:2]
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


def pickled_files(root: Path) -> list[Path]:
    """Files under `root` that are pickles by name or by content."""
    return [p for p in root.rglob("*") if p.is_file() and (p.suffix in PICKLE_SUFFIXES or _is_pickle(p))]


def test_the_api_key_is_sent_to_the_server_and_written_nowhere(runs, monkeypatch, capfd):
    secret = f"sk-jointopt-{uuid.uuid4().hex}"
    monkeypatch.setenv("MY_KEY", secret)
    with ChatServer({"sentiment": "positive"}) as server:
        # cache off: every call goes over HTTP, and no answer is kept outside the run directory
        args = [
            *tiny(4, 2, 2),
            "runtime.cache=false",
            "program.modules.classify.model=remote",
            "schedule.strategy=p",
            *server.model_overrides("remote", "MY_KEY"),
            "--runs-dir",
            runs,
        ]
        # baseline, a BootstrapFewShot step whose demos come from the server, test evaluations
        assert cli("joint", RECIPES / "sst2.yaml", *args) == 0
        assert cli("status", runs / "sst2", "--json") == 0
        assert cli("compare", runs / "sst2", "--json") == 0
    assert server.authorizations and set(server.authorizations) == {f"Bearer {secret}"}
    saved = json.loads((runs / "sst2" / "01-p" / "program.json").read_text())
    assert any(part.get("demos") for part in saved.values() if isinstance(part, dict))  # among the files searched
    out, err = capfd.readouterr()
    assert secret not in out + err
    assert files_containing(runs, secret.encode()) == []
    assert "MY_KEY" in (runs / "sst2" / "recipe.yaml").read_text()  # the recipe keeps the variable's name
    assert pickled_files(runs) == []


def test_pickles_are_recognized(tmp_path):
    import pickle

    (tmp_path / "state.dat").write_bytes(pickle.dumps({"a": 1}))
    with zipfile.ZipFile(tmp_path / "weights", "w") as archive:  # what torch.save writes
        archive.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    (tmp_path / "fine.json").write_text('{"a": 1}')
    assert sorted(pickled_files(tmp_path)) == [tmp_path / "state.dat", tmp_path / "weights"]


# ---------------------------------------------------------------- what loading a run directory may run
UNSAFE_MODULES = {"pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
UNSAFE_FLAGS = {"allow_pickle", "allow_unsafe_lm_state", "trust_remote_code"}


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def _unsafe_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{where} imports {n}" for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name, keywords = _call_name(node), {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "__import__"):
            found.append(f"{where} calls {name}")
        if name == "torch.load" and not (
            isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
        ):
            found.append(f"{where} torch.load without weights_only=True")
        for flag in UNSAFE_FLAGS & set(keywords):
            if not (isinstance(keywords[flag], ast.Constant) and keywords[flag].value is False):
                found.append(f"{where} passes {flag}")
    return found


def test_no_loader_can_run_code_from_a_file():
    """Run directories hold JSON, YAML (safe_load), DSPy's JSON programs and safetensors adapters;
    whatever jointopt reads back (its own checkpoints included) is read by loaders that run no code."""
    found = [use for path in sorted((ROOT / "jointcli").rglob("*.py")) for use in _unsafe_uses(path)]
    assert found == []


def test_only_the_recipe_names_code_to_import():
    """User code is imported by design, by one function (imports.import_ref), for two recipe keys:
    program.class and a package.module:function metric."""
    importers, callers = set(), set()
    for path in (ROOT / "jointcli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _call_name(node) in ("importlib.import_module", "import_module"):
                importers.add(path.name)
            if isinstance(node, ast.Call) and _call_name(node) == "import_ref":
                callers.add(path.name)
    assert importers == {"imports.py"} and callers == {"metrics.py", "program.py"}
