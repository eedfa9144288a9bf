"""What context-local routing costs: switching per request and the forward pass, beside peft.

``python -m benchmarks.routing [--model smollm2-135m] [--repeat 30]`` prints a table and
writes ``benchmarks/results/routing.json``. Sides, in one process on the same weights:

- ``with ak.use(model, name)`` (the calling thread's own choice) vs ``ak.use`` as a statement
  (the model-wide default) vs peft's ``set_adapter`` on a ``PeftModel`` copy;
- one forward (1 x 32 tokens) with no route, inside ``with ak.use``, and peft's forward;
- 4 threads, each with its own adapter, serving forwards at once: every output checked.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median_ms


def run(model_name: str, repeat: int, adapters: int = 16) -> dict[str, Any]:
    import peft

    import adapterkit as ak

    torch.manual_seed(0)
    model, _ = ak.load_base(model_name, task="causal-lm")
    model.eval()
    reference = copy.deepcopy(model)
    names = [f"a{i}" for i in range(adapters)]
    for n in names:
        ak.attach(model, "lora", name=n, r=8)
        for key, p in ak.trainable_parameters(model, n).items():
            if "lora_B" in key:
                torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    result: dict[str, Any] = {"model": model_name, "adapters": adapters, "tokens": 32}
    cycle = iter(range(10**9))

    def block():
        with ak.use(model, names[next(cycle) % adapters]):
            pass

    result["with_use_ms"] = median_ms(block, repeat * 10)
    result["statement_use_ms"] = median_ms(lambda: ak.use(model, names[next(cycle) % adapters]), repeat * 10)

    # peft on its own copy, with the same adapter weights
    from adapterkit.registry import default_registry

    lora = default_registry.get("lora")()
    peft_model = None
    for n in names:
        peft_cfg = lora.peft_config(reference, ak.get_adapter_record(model, n).config)
        if peft_model is None:
            peft_model = peft.get_peft_model(reference, peft_cfg, adapter_name=n)
        else:
            peft_model.add_adapter(n, peft_cfg)
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for n in names:
            for key, p in ak.trainable_parameters(model, n).items():
                # adapterkit names tensors as peft saves them (no adapter name); in the model peft has it
                theirs[key.replace(".lora_A.", f".lora_A.{n}.").replace(".lora_B.", f".lora_B.{n}.")].copy_(p)
    result["peft_set_adapter_ms"] = median_ms(lambda: peft_model.set_adapter(names[next(cycle) % adapters]), repeat)

    with torch.no_grad():
        ak.use(model, names[0])
        result["forward_default_ms"] = median_ms(lambda: model(ids), repeat)

        def routed():
            with ak.use(model, names[1]):
                model(ids)

        result["forward_in_with_use_ms"] = median_ms(routed, repeat)
        peft_model.set_adapter(names[1])
        result["forward_peft_ms"] = median_ms(lambda: peft_model(ids), repeat)
        with ak.use(model, names[1]):
            ours = model(ids).logits
        torch.testing.assert_close(ours, peft_model(ids).logits, rtol=1e-4, atol=1e-4)

        expected = {}
        for n in names[:4]:
            with ak.use(model, n):
                expected[n] = model(ids).logits
        wrong = []
        barrier = threading.Barrier(4)

        def serve(n):
            barrier.wait()
            for _ in range(repeat):
                with ak.use(model, n):
                    out = model(ids).logits
                if not torch.allclose(out, expected[n], rtol=1e-5, atol=1e-5):
                    wrong.append(n)

        threads = [threading.Thread(target=serve, args=(n,)) for n in names[:4]]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["threads"] = 4
        result["threaded_forwards"] = 4 * repeat
        result["threaded_wall_s"] = round(time.perf_counter() - started, 3)
        result["threaded_wrong_outputs"] = len(wrong)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/routing.json")
    args = parser.parse_args(argv)
    result = run(args.model, args.repeat)
    rows = [
        ("switch, `with ak.use` (enter + exit)", result["with_use_ms"]),
        ("switch, `ak.use` statement (default)", result["statement_use_ms"]),
        ("switch, peft `set_adapter`", result["peft_set_adapter_ms"]),
        ("forward 1x32, default adapter", result["forward_default_ms"]),
        ("forward 1x32, inside `with ak.use`", result["forward_in_with_use_ms"]),
        ("forward 1x32, peft", result["forward_peft_ms"]),
    ]
    print(f"{result['model']}, {result['adapters']} LoRA adapters loaded")
    print(f"{'what':<42}{'ms (median)':>12}")
    for what, ms in rows:
        print(f"{what:<42}{ms:>12.3f}")
    print(
        f"{result['threads']} threads x {result['threaded_forwards'] // result['threads']} forwards, each its own adapter: "
        f"{result['threaded_wall_s']} s, {result['threaded_wrong_outputs']} wrong outputs"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
