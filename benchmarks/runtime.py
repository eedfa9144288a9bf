"""Runtime costs on one loaded base: switching, loading, mixed batches, sizes on disk.

adapterkit beside peft's own ``set_adapter`` / ``load_adapter`` / mixed-batch forward, in the
same process on the same model and files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median_ms, peak_rss_mb


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _randomize(model, name: str) -> None:
    import adapterkit as ak

    for key, p in ak.trainable_parameters(model, name).items():
        if "lora_B" in key:
            torch.nn.init.normal_(p, std=0.02)


def run(settings: dict[str, Any]) -> dict[str, Any]:
    import peft

    import adapterkit as ak

    model_name = settings["model"]
    tmp = Path(tempfile.mkdtemp(prefix="ak-runtime-"))
    result: dict[str, Any] = {"model": model_name}
    model, tokenizer = ak.load_base(model_name, task="causal-lm")
    model.eval()
    lora = {"r": 8, "target_modules": settings.get("targets")}

    # sizes on disk, per strategy
    sizes = {}
    for strategy in ("lora", "prefix", "head"):
        ak.attach(model, strategy, name=f"size_{strategy}")
        sizes[strategy] = _folder_bytes(ak.save(model, tmp / f"size_{strategy}", name=f"size_{strategy}"))
        ak.detach(model, f"size_{strategy}")
    from adapterkit.models import resolve_model

    base_dir = Path(resolve_model(model_name).path)
    sizes["base_model"] = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    sizes["full"] = sizes["base_model"]  # a full fine-tune stores every weight
    result["size_bytes"] = sizes

    # switching: 2 and 16 adapters loaded
    names = [f"a{i}" for i in range(16)]
    for n in names[:2]:
        ak.attach(model, "lora", name=n, **{k: v for k, v in lora.items() if v is not None})
    cycle = iter(range(10**9))
    result["switch_ms_2"] = median_ms(lambda: ak.use(model, names[next(cycle) % 2]), settings["repeat"])
    for n in names[2:]:
        ak.attach(model, "lora", name=n, **{k: v for k, v in lora.items() if v is not None})
    for n in names:
        _randomize(model, n)
    result["switch_ms_16"] = median_ms(lambda: ak.use(model, names[next(cycle) % 16]), settings["repeat"])

    # peft on its own copy of the base
    base2, _ = ak.load_base(model_name, task="causal-lm")
    pcfg = ak.get_strategy("lora")().peft_config(base2, ak.LoraConfig(**{k: v for k, v in lora.items() if v is not None}))
    pm = peft.get_peft_model(base2, pcfg, adapter_name="a0")
    pm.add_adapter("a1", pcfg)
    result["peft_set_adapter_ms_2"] = median_ms(lambda: pm.set_adapter(["a0", "a1"][next(cycle) % 2]), settings["repeat"])
    for n in names[2:]:
        pm.add_adapter(n, pcfg)
    result["peft_set_adapter_ms_16"] = median_ms(lambda: pm.set_adapter(names[next(cycle) % 16]), settings["repeat"])

    # loading one LoRA adapter from disk
    ak.use(model, "a0")
    folder = ak.save(model, tmp / "a0", name="a0")
    counter = iter(range(10**9))

    def timed_load(load, unload) -> float:
        """Milliseconds of one load; the unload that follows is not timed."""
        n = f"disk{next(counter)}"
        started = time.perf_counter()
        load(n)
        ms = (time.perf_counter() - started) * 1e3
        unload(n)
        return ms

    ak_times, peft_times = [], []
    for _ in range(settings["load_repeat"]):  # alternate the two
        ak_times.append(timed_load(lambda n: ak.load(model, str(folder), name=n), lambda n: ak.detach(model, n)))
        peft_times.append(timed_load(lambda n: pm.load_adapter(str(folder), adapter_name=n), pm.delete_adapter))
    result["load_ms"] = statistics.median(ak_times)
    result["peft_load_adapter_ms"] = statistics.median(peft_times)
    result["lora_file_bytes"] = _folder_bytes(folder)

    # from the loopback Hub (download into an empty cache, then from the cache)
    try:
        result.update(_hub_load(model, folder, settings))
    except Exception as err:  # the Hub part needs the test server module; report, don't fail the suite
        result["hub_error"] = f"{type(err).__name__}: {err}"

    # mixed batch: 8 rows, 8 adapters, against one adapter at a time
    texts = ["The movie was a delight from start to finish, funny and warm."] * 8
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    rows = names[:8]

    @torch.inference_mode()
    def mixed():
        with ak.mixed_batch(model, rows):
            model(**enc)

    @torch.inference_mode()
    def sequential():
        for i, n in enumerate(rows):
            ak.use(model, n)
            model(input_ids=enc["input_ids"][i : i + 1], attention_mask=enc["attention_mask"][i : i + 1])

    @torch.inference_mode()
    def peft_mixed():
        pm(**enc, adapter_names=rows)

    @torch.inference_mode()
    def peft_sequential():
        for i, n in enumerate(rows):
            pm.set_adapter(n)
            pm(input_ids=enc["input_ids"][i : i + 1], attention_mask=enc["attention_mask"][i : i + 1])

    for fn in (mixed, sequential, peft_mixed, peft_sequential):
        fn()  # warm-up
    # alternate the four so that drift of this shared machine hits them alike
    times: dict[str, list[float]] = {"mixed": [], "sequential": [], "peft_mixed": [], "peft_sequential": []}
    for _ in range(settings["mixed_repeat"]):
        for key, fn in (("mixed", mixed), ("sequential", sequential), ("peft_mixed", peft_mixed),
                        ("peft_sequential", peft_sequential)):
            times[key].append(median_ms(fn, 1))
    result["mixed_batch_ms"] = statistics.median(times["mixed"])
    result["one_at_a_time_ms"] = statistics.median(times["sequential"])
    result["peft_mixed_batch_ms"] = statistics.median(times["peft_mixed"])
    result["peft_one_at_a_time_ms"] = statistics.median(times["peft_sequential"])
    result["mixed_speedup"] = result["one_at_a_time_ms"] / result["mixed_batch_ms"]
    result["tokens_per_row"] = int(enc["input_ids"].shape[1])
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


def _hub_load(model, folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from huggingface_hub import constants

    from tests.hubserver import HubServer

    import adapterkit as ak

    with HubServer() as server:
        constants.ENDPOINT = server.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        cache = Path(tempfile.mkdtemp(prefix="ak-hub-cache-"))
        constants.HF_HUB_CACHE = str(cache)
        os.environ["HF_TOKEN"] = "hf_bench"
        ak.publish(folder, "bench/lora")
        started = time.perf_counter()
        ak.load(model, "bench/lora", name="hub0")
        cold = (time.perf_counter() - started) * 1e3
        ak.detach(model, "hub0")
        counter = iter(range(1, 10**9))

        def warm():
            n = f"hub{next(counter)}"
            ak.load(model, "bench/lora", name=n)
            ak.detach(model, n)

        return {"hub_load_cold_ms": cold, "hub_load_cached_ms": median_ms(warm, settings["load_repeat"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", default="runtime")
    parser.add_argument("--settings", required=True)
    args = parser.parse_args()
    print(json.dumps(run(json.loads(args.settings))))


if __name__ == "__main__":
    main()
