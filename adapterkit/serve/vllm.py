"""``adapterkit serve --engine vllm``: the same adapters, served by vLLM's OpenAI server.

adapterkit does the part it owns and vLLM does not: it pulls every adapter (a folder, or a Hub
repo downloaded and checked against its manifest), reads it with the same checks as
``ak.load``, refuses what vLLM cannot serve, and verifies each adapter against the base's
fingerprint (the base is loaded once here for that, then freed before vLLM starts). Then it
starts ``python -m vllm.entrypoints.openai.api_server`` as a child process, forwards its output
to logging and stops it (and the engine processes it spawned) when adapterkit exits or is
signalled.

vLLM lives in an environment of its own (its CPU build pins torch and transformers):
``--vllm-python`` or ``$ADAPTERKIT_VLLM_PYTHON`` names that environment's Python;
``scripts/setup-vllm-env.sh`` creates one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import adapterkit.artifacts as artifacts
import adapterkit.hub as hub
from adapterkit.base_model import load_base
from adapterkit.errors import AdapterKitError, AdapterNotFoundError, IncompatibleModelError, InvalidOptionError
from adapterkit.model_info import base_model_id
from adapterkit.models import resolve_model
from adapterkit.sources import resolve_source

logger = logging.getLogger(__name__)
#: vLLM's own output is logged under this name, at the level each line carries
server_logger = logging.getLogger("adapterkit.serve.vllm.server")

#: the environment variable that names a Python with vLLM when --vllm-python is not given
VLLM_PYTHON_ENV = "ADAPTERKIT_VLLM_PYTHON"
#: the ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the only tensors of a LoRA file vLLM reads: anything else changes what it would compute
_LORA_TENSOR = re.compile(r"\.lora_[AB]\.weight$")
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


class VllmError(AdapterKitError, RuntimeError):
    """vLLM could not be found, did not start, or stopped."""


@dataclasses.dataclass(frozen=True)
class VllmAdapter:
    """An adapter checked for vLLM: the name it is served under and the folder vLLM reads."""

    name: str
    source: str
    folder: Path
    rank: int


@dataclasses.dataclass(frozen=True)
class VllmPlan:
    """What vLLM is started with: the base (a folder or Hub id), the names it answers to, the adapters."""

    model: str
    served_names: list[str]
    adapters: list[VllmAdapter]


def base_folder(base: str) -> str:
    """What vLLM's ``--model`` gets for ``base``: the converted folder of an embedded alias, a folder, or a Hub id."""
    return resolve_model(base).path


def _export_hint(saved: artifacts.SavedAdapter, source: str) -> str:
    if not saved.strategy.merges_into_weights:
        return ("It cannot be merged into the base's weights either: serve it with the embedded engine "
                "(adapterkit serve without --engine vllm).")
    return (
        f"Merge it into its base and serve the merged checkpoint instead: ak.export({source!r}, 'merged/') or "
        f"`adapterkit export {source} merged/`, then `adapterkit serve --engine vllm --base merged/`; or serve it "
        "with the embedded engine (no --engine vllm)."
    )


def check_servable(saved: artifacts.SavedAdapter, source: str) -> int:
    """Refuse an adapter vLLM cannot serve; return its LoRA rank (the largest of its layers).

    vLLM serves plain LoRA on linear layers: not DoRA, not a trained label head
    (``modules_to_save``), not prefix, head or full adapters.
    """
    strategy = saved.strategy.name
    if strategy != "lora":
        raise IncompatibleModelError(f"{source} is a '{strategy}' adapter; vLLM serves LoRA adapters only. "
                                     + _export_hint(saved, source))
    if getattr(saved.config, "use_dora", False):
        raise IncompatibleModelError(f"{source} is a DoRA adapter (use_dora=True); vLLM serves plain LoRA only. "
                                     + _export_hint(saved, source))
    extra = sorted(k for k in saved.tensors if not _LORA_TENSOR.search(k))
    heads = (saved.sidecar or {}).get("head_modules") or []
    if heads or extra:
        what = (f"trains the label head {', '.join(heads)} (peft's modules_to_save)" if heads else
                f"holds tensors other than LoRA's A and B ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
        raise IncompatibleModelError(f"{source} {what}; vLLM applies only LoRA's A and B matrices and would serve "
                                     "it without them. " + _export_hint(saved, source))
    ranks = [t.shape[0] for k, t in saved.tensors.items() if k.endswith(".lora_A.weight")]
    if not ranks:
        raise IncompatibleModelError(f"{source} has no LoRA tensors to serve. Save or download the adapter again.")
    return max(ranks)


def fetch(source: str) -> tuple[Path, bool]:
    """The local folder of adapter ``source`` and whether its manifest was just checked (a Hub download)."""
    found = resolve_source(source, what="adapter", error=AdapterNotFoundError)
    if found.kind == "file":
        raise AdapterNotFoundError(f"{source} is a file; pass the adapter folder that holds it.")
    if found.kind == "folder":
        return found.path.resolve(), False
    return hub.download(found.repo_id), True


def prepare(base: str, adapters: Sequence[tuple[str, str]]) -> VllmPlan:
    """Pull, read and check ``adapters`` (``(name, source)`` pairs) for serving on ``base`` with vLLM.

    Every adapter is read and refused (if vLLM cannot serve it) before the base is loaded; then
    the base is loaded once on the CPU and each adapter checked against its fingerprint, as
    ``ak.load`` does, and freed again before vLLM needs the memory.

    Raises:
        IncompatibleModelError: an adapter vLLM cannot serve (the message says how to export it).
        AdapterMismatchError: an adapter trained on another base.
        AdapterNotFoundError, AdapterFormatError, HubError: as ``ak.load`` raises them.
    """
    model_path = base_folder(base)
    read = []
    for name, source in adapters:
        folder, checked = fetch(source)
        saved = artifacts.read_folder(folder, manifest_checked=checked)
        read.append((name, source, saved, check_servable(saved, source)))
    model, _ = load_base(base)
    try:
        for _, source, saved, _ in read:
            artifacts.check_fits(model, saved, ignore_mismatch=False, where=source)
        served = [base] + [n for n in (base_model_id(model),) if n and n != base]
    finally:
        del model
        gc.collect()
    return VllmPlan(model_path, served, [VllmAdapter(n, s, saved.folder, r) for n, s, saved, r in read])


def lora_rank_limit(ranks: Sequence[int]) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds every rank in ``ranks``."""
    top = max(ranks, default=1)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= top:
            return allowed
    raise IncompatibleModelError(f"An adapter has rank {top}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}.")


def vllm_command(plan: VllmPlan, *, python: str, host: str, port: int, max_loras: int,
                 extra: Sequence[str] = ()) -> list[str]:
    """The command line that starts vLLM's OpenAI server for ``plan`` (``extra`` is appended as is).

    The API key is not on it (command lines are visible to every user in ``ps``): see :func:`vllm_env`.
    """
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", plan.model,
            "--served-model-name", *plan.served_names, "--host", host, "--port", str(port)]
    if plan.adapters:
        argv += ["--enable-lora", "--lora-modules", *(f"{a.name}={a.folder}" for a in plan.adapters),
                 "--max-loras", str(max(1, min(max_loras, len(plan.adapters)))),
                 "--max-lora-rank", str(lora_rank_limit([a.rank for a in plan.adapters]))]
    return argv + list(extra)


def vllm_env(api_key: str | None) -> dict[str, str]:
    """The child's environment: ours, with the API key as ``VLLM_API_KEY`` (vLLM reads it there too)."""
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def find_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM: ``explicit``, ``$ADAPTERKIT_VLLM_PYTHON``, or this one if it has vLLM.

    Raises:
        VllmError: none is given and this Python has no vLLM, or the one given has none.
    """
    python = explicit or os.environ.get(VLLM_PYTHON_ENV)
    setup = "scripts/setup-vllm-env.sh creates an environment with vLLM's CPU build"
    if not python:
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
        raise VllmError(f"--engine vllm needs a Python with vLLM: pass --vllm-python PATH or set {VLLM_PYTHON_ENV} "
                        f"({setup}).")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except OSError as err:
        raise VllmError(f"Cannot run the vLLM Python {python}: {err}. {setup}.") from err
    if not found:
        raise VllmError(f"{python} has no vLLM installed ({setup}, then pass its bin/python).")
    return python


class VllmServer:
    """vLLM's server as a child process: started, waited on until it answers, and stopped with its engine.

    The child runs in a session of its own, so that stopping it reaches the engine processes
    vLLM spawns, and a Ctrl-C in a terminal is handled here (stop) rather than by each of them.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, url: str, name: str = "vLLM") -> None:
        self.argv, self.env, self.url, self.name = list(argv), env, url.rstrip("/"), name
        self.process: subprocess.Popen | None = None
        #: vLLM's last lines, quoted when it exits before it serves
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the child and the thread that forwards its output to logging."""
        logger.info("Starting %s: %s", self.name, " ".join(self.argv))
        self.process = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace",
                                        start_new_session=True)
        self._reader = threading.Thread(target=self._forward, name="vllm-output", daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip()
            if line:
                self.tail.append(line)
                level = _LEVEL.search(line[:60])
                server_logger.log(logging.getLevelName(level.group(1)) if level else logging.INFO, "%s", line)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until ``/health`` answers 200.

        Raises:
            VllmError: the child exited first (its last lines are in the message), or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.poll()
            if code is not None:
                self._join_reader()
                raise VllmError(f"{self.name} exited with status {code} before it served. Its last lines:\n  "
                                + "\n  ".join(self.tail))
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.5)
        raise VllmError(f"{self.name} did not answer {self.url}/health within {timeout:.0f} s.")

    def poll(self) -> int | None:
        """The child's exit status, or None while it runs."""
        return None if self.process is None else self.process.poll()

    def wait(self) -> int:
        """Wait for the child to exit; its exit status."""
        assert self.process is not None
        code = self.process.wait()
        self._join_reader()
        return code

    def stop(self, grace: float = 30.0) -> None:
        """Stop vLLM and its engine processes: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            self._join_reader()
            return
        logger.info("Stopping %s (pid %d)", self.name, self.process.pid)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it.", self.name, grace)
        # The engine processes vLLM spawned may outlive it: the whole session goes.
        self._signal(signal.SIGKILL)
        self.process.wait()
        self._join_reader()

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # the child's own session: vLLM and what it spawned
        except ProcessLookupError:
            pass

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_url(host: str, port: int) -> str:
    """The URL this machine reaches a server bound to ``host:port`` at (a wildcard address means loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def _stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit meanwhile, so that the code stopping vLLM runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGHUP)

    def leave(signum: int, _frame: object) -> None:
        for sig in signals:  # a second signal must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(plan: VllmPlan, *, python: str, host: str, port: int, max_loras: int, api_key: str | None = None,
          extra: Sequence[str] = (), ready_timeout: float = 600.0) -> int:
    """Run vLLM's server for ``plan`` until it exits or this process is interrupted; its exit status."""
    if not plan.adapters:
        logger.warning("No --adapter given: vLLM serves the base only.")
    argv = vllm_command(plan, python=python, host=host, port=port, max_loras=max_loras, extra=extra)
    server = VllmServer(argv, env=vllm_env(api_key), url=local_url(host, port))
    with _stopping_on_signals():
        try:
            server.start()
            server.wait_ready(ready_timeout)
            print(f"adapterkit serve (vLLM): {plan.served_names[0]} with {len(plan.adapters)} adapter(s) on "
                  f"http://{host}:{port}", flush=True)
            return server.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            server.stop()


def check_options(**given: object) -> None:
    """Refuse embedded-engine options that ``--engine vllm`` would otherwise silently ignore."""
    used = sorted(f"--{k.replace('_', '-')}" for k, v in given.items() if v)
    if used:
        raise InvalidOptionError(
            f"{', '.join(used)} apply to the embedded engine only; vLLM does not use them. Drop them, or pass vLLM's "
            "own options with --vllm-arg (for example --vllm-arg=--dtype=float32)."
        )
