"""Check that ``adapterkit serve --engine vllm`` answers like the embedded engine, greedy, token for token.

Needs an environment with vLLM (``bash scripts/setup-vllm-env.sh``)::

    ADAPTERKIT_VLLM_PYTHON=$PWD/.venv-vllm/bin/python .venv/bin/python scripts/check_vllm.py

It makes two LoRA adapters on smollm2-135m (r=8, weights perturbed so each answers its own
way), starts ``adapterkit serve --engine vllm`` and the embedded ``adapterkit serve`` on them
(both from the command line, both with an API key), sends the same prompts and chat messages
with temperature 0 to both through the ``openai`` client, and reports where greedy outputs
match and, where they do not, at which token they part. It also checks that both refuse a
request without the key, and that vLLM's processes are gone once ``adapterkit serve`` is
stopped with SIGTERM. Exit status 0 when every output matches.

Not part of the test suite (a vLLM start takes a minute or two on a CPU):
``tests/test_vllm.py::test_check_vllm_script`` runs it when ``$ADAPTERKIT_VLLM_PYTHON`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch
from transformers import AutoTokenizer

import adapterkit as ak
from adapterkit.serve.vllm import VLLM_PYTHON_ENV, VllmServer, base_folder, find_python

BASE = "smollm2-135m"
KEY = "check-vllm-key"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Three reasons to learn a second language:",
]
ADAPTERS = ["alpha", "beta"]
CHATS = ["What is the tallest mountain in the world?", "Give me a name for a pet turtle."]


def make_adapters(root: Path) -> dict[str, Path]:
    """Two LoRA adapters (r=8) on the base, their B matrices perturbed (a fresh B is zero: no change)."""
    folders = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        model, _ = ak.load_base(BASE)
        ak.attach(model, "lora", r=8, name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in ak.trainable_parameters(model, name).items():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        folders[name] = ak.save(model, root / name)
    return folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, folders: dict[str, Path], extra: list[str]) -> list[str]:
    cli = Path(sys.executable).with_name("adapterkit")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "adapterkit.cli"]
    adapters = [arg for name, folder in folders.items() for arg in ("--adapter", f"{name}={folder}")]
    return [*command, "-v", "serve", "--base", BASE, *adapters, "--port", str(port), *extra]


def ask(client: openai.OpenAI, model: str, prompt: str, chat: bool, max_tokens: int) -> str:
    if chat:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0)
        return out.choices[0].message.content or ""
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def compare(tokenizer, embedded: str, vllm: str) -> dict:
    """Whether two texts match, and where their tokens part (re-tokenized with the base's tokenizer)."""
    a, b = tokenizer.encode(embedded, add_special_tokens=False), tokenizer.encode(vllm, add_special_tokens=False)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"match": embedded == vllm, "common_tokens": same, "embedded_tokens": len(a), "vllm_tokens": len(b),
            "embedded": embedded, "vllm": vllm}


def refuses_without_key(url: str, model: str) -> bool:
    try:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model=model, prompt="x", max_tokens=1)
    except openai.AuthenticationError:
        return True
    return False


def vllm_processes(port: int) -> list[int]:
    """Processes whose command line runs vLLM's server on ``port`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and str(port).encode() in argv:
            found.append(int(proc.name))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV),
                        help=f"the Python with vLLM (default: ${VLLM_PYTHON_ENV})")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype (the embedded engine serves float32)")
    parser.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE for vLLM's CPU backend")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--log", type=Path, default=None, help="write both servers' logs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, filename=args.log, format="%(asctime)s %(name)s: %(message)s")
    python = find_python(args.vllm_python)
    env = {**os.environ, "ADAPTERKIT_API_KEY": KEY, "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib}
    tokenizer = AutoTokenizer.from_pretrained(base_folder(BASE))
    with tempfile.TemporaryDirectory(prefix="check-vllm-") as tmp:
        folders = make_adapters(Path(tmp))
        ports = {"embedded": free_port(), "vllm": free_port()}
        commands = {
            "embedded": serve_command(ports["embedded"], folders, []),
            "vllm": serve_command(ports["vllm"], folders, ["--engine", "vllm", "--vllm-python", python,
                                                          f"--vllm-arg=--dtype={args.dtype}"]),
        }
        servers = {k: VllmServer(c, env=env, url=f"http://127.0.0.1:{ports[k]}", name=f"adapterkit serve ({k})")
                   for k, c in commands.items()}
        report: dict = {"base": BASE, "vllm_dtype": args.dtype, "max_tokens": args.max_tokens, "outputs": []}
        try:
            started = time.monotonic()
            for server in servers.values():
                server.start()
            for name, server in servers.items():
                server.wait_ready(900)
                report[f"{name}_ready_s"] = round(time.monotonic() - started, 1)
            clients = {k: openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0) for k, s in servers.items()}
            report["refuses_without_key"] = {k: refuses_without_key(s.url, BASE) for k, s in servers.items()}
            for model in [*folders, BASE]:
                for chat, prompt in [(False, p) for p in PROMPTS] + [(True, c) for c in CHATS]:
                    texts = {k: ask(c, model, prompt, chat, args.max_tokens) for k, c in clients.items()}
                    row = {"model": model, "chat": chat, "prompt": prompt,
                           **compare(tokenizer, texts["embedded"], texts["vllm"])}
                    report["outputs"].append(row)
                    print(f"{'same' if row['match'] else 'DIFF'} {model:13} {prompt[:40]!r:44} common tokens "
                          f"{row['common_tokens']}/{row['embedded_tokens']}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
        report["vllm_left_running"] = vllm_processes(ports["vllm"])
    rows = report["outputs"]
    report["matched"] = sum(r["match"] for r in rows)
    report["total"] = len(rows)
    # Each adapter must answer some prompt otherwise than the base, or matching proves nothing.
    base_text = {r["prompt"]: r["embedded"] for r in rows if r["model"] == BASE}
    report["adapters_change_outputs"] = all(
        any(r["embedded"] != base_text[r["prompt"]] for r in rows if r["model"] == name) for name in ADAPTERS)
    print(json.dumps({k: v for k, v in report.items() if k != "outputs"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ok = (report["matched"] == report["total"] and all(report["refuses_without_key"].values())
          and report["adapters_change_outputs"])
    return 0 if ok and not report["vllm_left_running"] else 1


if __name__ == "__main__":
    sys.exit(main())
