"""AdapterPool: outputs equal ak.load + ak.use, per-row routing, LRU slots, reloads, threads.

Every reference is ``ak.load`` + ``ak.use`` on a fresh copy of the same tiny base; the pool's
output for a row must equal the reference's output for that row (fp32, within 1e-5).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterNotFoundError, IncompatibleModelError, InvalidOptionError
from adapterkit.errors import PoolFullError
from adapterkit.serve.pool import AdapterPool
from adapterkit.targets import linear_layer_names
from tests.tiny import TINY, make_batch, save_tiny

ARCHS = ["bert", "gpt2", "llama", "llama_cls"]
#: a: plain LoRA; b: smaller rank with rsLoRA and its own alpha; c: DoRA
ADAPTERS = {"a": {"r": 4}, "b": {"r": 2, "use_rslora": True, "lora_alpha": 6}, "c": {"r": 4, "use_dora": True}}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _base(arch: str):
    torch.manual_seed(0)
    return TINY[arch]().eval()


def _inputs(arch: str, batch_size: int = 4) -> dict[str, torch.Tensor]:
    batch = make_batch(arch, batch_size=batch_size)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _make_adapter(arch: str, folder: Path, *, seed: int, strategy: str = "lora", model=None, **options) -> Path:
    """A saved adapter with random (non-zero) weights, trained label head included."""
    model = _base(arch) if model is None else model
    ak.attach(model, strategy, name="x", **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in ak.trainable_parameters(model, "x").items():
            noise = torch.randn(p.shape, generator=g)
            if "magnitude" in key:
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return ak.save(model, folder, name="x")


def _reference(arch: str, folder: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = _base(arch)
    ak.load(model, str(folder), name="x")
    ak.use(model, "x")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("pool")
    return {
        arch: {name: _make_adapter(arch, root / arch / name, seed=i + 1, **opts) for i, (name, opts) in enumerate(ADAPTERS.items())}
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def references(saved) -> dict[str, dict[str | None, torch.Tensor]]:
    """Per arch, each adapter's logits on ``_inputs(arch)`` through ak.load + ak.use (None: the bare base)."""
    out = {}
    for arch, folders in saved.items():
        with torch.no_grad():
            out[arch] = {None: _base(arch)(**_inputs(arch)).logits}
        out[arch].update({n: _reference(arch, f, _inputs(arch)) for n, f in folders.items()})
    return out


def _pool(arch: str, saved, **options) -> tuple[torch.nn.Module, AdapterPool]:
    model = _base(arch)
    pool = AdapterPool(model, **{"slots": 4, "max_rank": 8, **options})
    for name, folder in saved[arch].items():
        pool.load(folder, name=name)
    return model, pool


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_rows_equal_one_adapter_at_a_time(arch, saved, references):
    model, pool = _pool(arch, saved)
    expected = references[arch]
    for name in ADAPTERS:  # each adapter changes every row: a row served by the wrong one would show
        assert all(not torch.allclose(expected[name][i], expected[None][i], **TOL) for i in range(4))
    # every row its own adapter; another order; groups of unequal size (padded in the grouped matmul)
    for rows in (["a", "b", None, "c"], ["c", None, "a", "b"], ["c", "a", None, "c"]):
        with torch.no_grad(), pool.route(rows):
            out = model(**_inputs(arch)).logits
        for i, name in enumerate(rows):
            torch.testing.assert_close(out[i], expected[name][i], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_batch_route_equals_load_and_use(arch, saved, references):
    model, pool = _pool(arch, saved)
    inputs = _inputs(arch)
    with torch.no_grad():
        for name in ADAPTERS:
            with pool.route(name):
                torch.testing.assert_close(model(**inputs).logits, references[arch][name], **TOL)
            with pool.route([name] * 4):
                torch.testing.assert_close(model(**inputs).logits, references[arch][name], **TOL)
        # no route, and a route to the base: the bare base, exactly
        torch.testing.assert_close(model(**inputs).logits, references[arch][None], rtol=0, atol=0)
        with pool.route(None):
            torch.testing.assert_close(model(**inputs).logits, references[arch][None], rtol=0, atol=0)


def test_classifier_heads_route_per_row(saved):
    model, pool = _pool("bert", saved)
    assert pool.stats()["head_layers"] == 2  # bert.pooler.dense and classifier
    assert pool.info("a")["has_head"]
    # The heads are what differ most between these adapters: the predictions differ by row.
    inputs = _inputs("bert")
    with torch.no_grad(), pool.route(["a", "b", "c", "a"]):
        out = model(**inputs).logits
    assert not torch.allclose(out[0], out[1])


def test_head_with_another_label_count(tmp_path):
    # A 5-label adapter on a 3-label base: routed alone it gives 5 logits; mixed with 3-label rows it is refused.
    config = TINY["bert"]().config
    config.num_labels = 5
    torch.manual_seed(0)  # the same backbone as _base("bert"), another classifier
    folder = _make_adapter("bert", tmp_path / "five", seed=5, model=type(TINY["bert"]())(config).eval(), r=2)
    model = _base("bert")
    pool = AdapterPool(model, slots=2, max_rank=4)
    pool.load(folder, name="five", ignore_mismatch=True)
    assert len(pool.label_names("five")) == 5
    inputs = _inputs("bert")
    reference = _base("bert")
    ak.load(reference, str(folder), name="five", ignore_mismatch=True)
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert expected.shape == (4, 5)
        with pool.route("five"):
            torch.testing.assert_close(model(**inputs).logits, expected, **TOL)
        with pool.route(["five"] * 4):
            torch.testing.assert_close(model(**inputs).logits, expected, **TOL)
        with pytest.raises(IncompatibleModelError, match="different numbers of outputs"), pool.route(["five", None, None, None]):
            model(**inputs)


def test_lru_eviction_cpu_tier_and_stats(saved, references):
    model, pool = _pool("llama", saved, slots=2, cpu_slots=1)
    # loading 3 adapters into 2 slots evicted the oldest, "a", to the CPU tier
    stats = pool.stats()
    assert (stats["loads"], stats["evictions"], stats["in_slots"], stats["on_cpu"], len(pool)) == (3, 1, 2, 1, 3)
    assert pool.info("a")["slot"] is None and pool.info("a")["on_cpu"]
    assert all(n in pool for n in ADAPTERS) and "zzz" not in pool
    inputs = _inputs("llama")
    with torch.no_grad():
        with pool.route("a"):  # back from the CPU: a copy, no file read; "b" (least recent) goes to the CPU
            torch.testing.assert_close(model(**inputs).logits, references["llama"]["a"], **TOL)
        stats = pool.stats()
        assert (stats["cpu_hits"], stats["loads"], stats["evictions"]) == (1, 3, 2)
        assert pool.info("b")["on_cpu"] and pool.info("c")["slot"] is not None
        pool.load(saved["llama"]["c"], name="d")  # evicts "c" (least recent); the CPU tier holds one: "b" is dropped
        assert pool.info("c")["on_cpu"] and not pool.info("b")["on_cpu"] and pool.info("b")["slot"] is None
        with pool.route("b"):  # past the CPU tier: read from its folder again
            torch.testing.assert_close(model(**inputs).logits, references["llama"]["b"], **TOL)
        assert pool.stats()["loads"] == 5
        hits = pool.stats()["hits"]
        with pool.route("b"):
            pass
        assert pool.stats()["hits"] == hits + 1
        for name in ("a", "b", "c", "b", "a", "c"):  # churn: every adapter still right
            with pool.route(name):
                torch.testing.assert_close(model(**inputs).logits, references["llama"][name], **TOL)
    assert pool.stats()["load_seconds"] > 0


def test_pinning_and_full_pool(saved):
    model, pool = _pool("llama", saved, slots=2)
    pool.pin("b")
    pool.pin("c")
    with pytest.raises(PoolFullError, match="pinned"):
        with pool.route("a"):
            pass
    pool.unpin("c")
    with pool.route("a"):
        assert pool.info("a")["slot"] is not None
        # a running route holds its slot: the other two cannot both get one
        with pytest.raises(PoolFullError, match="in use"):
            with pool.route("c"):
                pass
    assert pool.info("b")["slot"] is not None  # pinned: never evicted
    with pytest.raises(PoolFullError, match="slots>=3"):
        with pool.route(["a", "b", "c"]):
            pass


def test_reload_changed_files_never_serves_stale_weights(tmp_path, saved, references):
    folder = tmp_path / "x"
    shutil.copytree(saved["llama"]["a"], folder)
    model = _base("llama")
    pool = AdapterPool(model, slots=2, max_rank=8)
    pool.load(folder, name="x")
    first = pool.info("x")["digest"]
    pool.load(folder, name="x")  # same bytes, same name: a hit, nothing read
    assert pool.stats()["loads"] == 1 and pool.stats()["hits"] == 1
    inputs = _inputs("llama")
    with pool.route("x"):  # a route running while the files change and are reloaded
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, references["llama"]["a"], **TOL)
        shutil.rmtree(folder)
        shutil.copytree(saved["llama"]["c"], folder)
        pool.load(folder, name="x")
        with torch.no_grad():  # the running route keeps the weights it started with
            torch.testing.assert_close(model(**inputs).logits, references["llama"]["a"], **TOL)
    assert pool.info("x")["digest"] != first and pool.stats()["loads"] == 2
    with torch.no_grad(), pool.route("x"):
        torch.testing.assert_close(model(**inputs).logits, references["llama"]["c"], **TOL)
    assert pool.stats()["in_slots"] == 1  # the old version's slot was freed when its route ended


def test_unknown_names_and_load_missing(saved, references):
    model, pool = _pool("llama", saved)
    with pytest.raises(AdapterNotFoundError, match="load_missing=True"):
        with pool.route(["a", "nope"]):
            pass
    source = str(saved["llama"]["b"])
    with torch.no_grad(), pool.route([source, "a", None, source], load_missing=True):
        out = model(**_inputs("llama")).logits
    for i, name in enumerate(["b", "a", None, "b"]):
        torch.testing.assert_close(out[i], references["llama"][name][i], **TOL)
    assert source in pool
    pool.unload(source)
    assert source not in pool
    with pytest.raises(InvalidOptionError, match="one name"):
        pool.route([]).__enter__()
    with pytest.raises(AdapterNotFoundError):
        pool.unload("nope")


def test_row_count_and_generate(saved):
    model, pool = _pool("llama", saved)
    inputs = _inputs("llama")
    with pytest.raises(IncompatibleModelError, match="3 adapters but the batch has 4 rows"), pool.route(["a", "b", None]):
        model(**inputs)
    # generation under a mixed route: each row equals its adapter's own greedy generation
    prompt = {k: v[:3, :5] for k, v in inputs.items()}
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with pool.route(["a", "c", None]):
            mixed = model.generate(**prompt, **settings)
        for i, name in enumerate(["a", "c", None]):
            with pool.route(name):
                alone = model.generate(**prompt, **settings)
            assert torch.equal(mixed[i], alone[i])
        with pytest.raises(IncompatibleModelError, match="num_return_sequences"), pool.route(["a", "c", None]):
            model.generate(**prompt, **settings, num_beams=2, num_return_sequences=2)


def test_refusals(tmp_path, saved):
    # a model that already carries adapters
    adapted = _base("llama")
    ak.attach(adapted, "lora", r=2)
    with pytest.raises(IncompatibleModelError, match="carries adapterkit adapters"):
        AdapterPool(adapted)
    model = _base("llama")
    pool = AdapterPool(model, slots=2, max_rank=2)
    with pytest.raises(IncompatibleModelError, match="already belongs to an AdapterPool"):
        AdapterPool(model)
    # rank above max_rank
    with pytest.raises(IncompatibleModelError, match="max_rank=4"):
        pool.load(saved["llama"]["a"])
    # prefix and head adapters: use ak.load / ak.use
    for strategy, options in (("prefix", {"num_virtual_tokens": 2}), ("head", {})):
        folder = _make_adapter("llama", tmp_path / strategy, seed=3, strategy=strategy, **options)
        with pytest.raises(IncompatibleModelError, match=r"'%s' adapter.*ak\.load" % strategy):
            pool.load(folder)
    # an adapter on layers the pool did not wrap
    narrow = AdapterPool(_base("llama"), slots=2, max_rank=8, target_modules=["q_proj", "v_proj"])
    assert narrow.stats()["layers"] == 4
    with pytest.raises(IncompatibleModelError, match="target_modules=None"):
        narrow.load(saved["llama"]["a"])
    with pytest.raises(InvalidOptionError, match="slots must be a positive integer"):
        AdapterPool(_base("llama"), slots=0)
    assert len(pool) == 0


def test_close_restores_the_base(saved):
    model = _base("gpt2")
    classes = {n: type(m) for n, m in model.named_modules()}
    pool = AdapterPool(model, slots=2, max_rank=8)
    assert len(linear_layer_names(model)) == pool.stats()["layers"] == 8  # Conv1D layers found and pooled
    assert {n: type(m).__name__ for n, m in model.named_modules()} == {n: c.__name__ for n, c in classes.items()}
    pool.load(saved["gpt2"]["a"], name="a")
    pool.close()
    assert {n: type(m) for n, m in model.named_modules()} == classes
    AdapterPool(model)  # a closed pool's model can be pooled again


def test_threads_get_their_own_routes(saved, references):
    model, pool = _pool("llama", saved)
    inputs = _inputs("llama")
    wrong: list[str] = []
    barrier = threading.Barrier(4)
    routes = [["a"] * 4, ["b", "c", None, "a"], "c", ["c", "b", "a", None]]

    def expected(names):
        rows = [names] * 4 if isinstance(names, str) else names
        return torch.stack([references["llama"][n][i] for i, n in enumerate(rows)])

    def serve(names):
        barrier.wait()
        for _ in range(15):
            with torch.no_grad(), pool.route(names):
                out = model(**inputs).logits
            if not torch.allclose(out, expected(names), **TOL):
                wrong.append(str(names))

    threads = [threading.Thread(target=serve, args=(r,)) for r in routes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_loading_and_evicting_while_threads_run_forwards(tmp_path, saved, references):
    # Two slots, three adapters: every route forces evictions and reloads while other threads run forwards.
    model, pool = _pool("llama", saved, slots=2, cpu_slots=1)
    inputs = _inputs("llama")
    wrong: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve(name):
        while not stop.is_set():
            try:
                with torch.no_grad(), pool.route(name):
                    out = model(**inputs).logits
            except PoolFullError:  # both slots in use by the other threads: a caller retries
                continue
            except BaseException as err:  # noqa: BLE001 (reported below)
                errors.append(err)
                return
            if not torch.allclose(out, references["llama"][name], **TOL):
                wrong.append(name)

    def churn():
        for i in range(10):
            try:
                pool.load(saved["llama"]["abc"[i % 3]], name=f"extra{i % 2}")
            except PoolFullError:
                continue
            pool.unload(f"extra{i % 2}")

    threads = [threading.Thread(target=serve, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    churn()
    stop.set()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert pool.stats()["evictions"] > 0


def test_asyncio_tasks_see_their_own_routes(saved, references):
    model, pool = _pool("llama", saved)
    inputs = _inputs("llama")

    async def serve(name):
        with pool.route(name):
            await asyncio.sleep(0)  # another task routes in between
            with torch.no_grad():
                return model(**inputs).logits

    async def main():
        return await asyncio.gather(*(serve(n) for n in ("a", "b", "c", "a")))

    for name, out in zip(("a", "b", "c", "a"), asyncio.run(main())):
        torch.testing.assert_close(out, references["llama"][name], **TOL)


@pytest.mark.bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_keeps_its_layers_and_adds_the_delta(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    base_dir = save_tiny("llama", tmp_path / "base", wide=True)
    trainer, _ = ak.load_base(base_dir, task="causal-lm", bits=bits)
    folders = {}
    for name, options in (("a", {"r": 4}), ("c", {"r": 4, "use_dora": True})):
        ak.attach(trainer, "lora", name=name, **options)
        g = torch.Generator().manual_seed(len(folders) + 1)
        with torch.no_grad():
            for key, p in ak.trainable_parameters(trainer, name).items():
                if "lora_" in key and "magnitude" not in key:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        folders[name] = ak.save(trainer, tmp_path / name, name=name)
    inputs = _inputs("llama")
    model, _ = ak.load_base(base_dir, task="causal-lm", bits=bits)
    pool = AdapterPool(model, slots=2, max_rank=4)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")}
    assert kinds == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    for name, folder in folders.items():
        pool.load(folder, name=name)
    with torch.no_grad():
        with pool.route(["a", "c", None, "a"]):
            out = model(**inputs).logits
        for name in folders:
            reference, _ = ak.load_base(base_dir, task="causal-lm", bits=bits)
            ak.load(reference, str(folders[name]), name=name)
            ak.use(reference, name)
            expected = reference(**inputs).logits
            for i in [i for i, n in enumerate(["a", "c", None, "a"]) if n == name]:
                torch.testing.assert_close(out[i], expected[i], rtol=1e-4, atol=1e-4)


def test_benchmark_quick_smoke(tmp_path):
    from benchmarks import pool as bench

    model_dir = save_tiny("llama", tmp_path / "base")
    out = tmp_path / "pool.json"
    result = bench.main(["--model", model_dir, "--quick", "--threads", "0", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["load"]["pool_ms"] > 0 and written["load"]["ak_load_ms"] > 0 and written["load"]["peft_load_adapter_ms"] > 0
    assert {r["distinct_adapters"] for r in written["mixed"]["rows"]} == set(result["mixed"]["settings"]["distinct"])
    for row in written["mixed"]["rows"]:
        assert 0 < row["pool_fraction_of_base"] and 0 < row["peft_fraction_of_base"]


def test_loads_in_and_out_of_inference_mode(saved, references):
    # A server may make the pool and load under torch.inference_mode, and load again outside it.
    model = _base("llama")
    with torch.inference_mode():
        pool = AdapterPool(model, slots=1, max_rank=8, cpu_slots=0)
        pool.load(saved["llama"]["c"], name="c")  # DoRA: its scales' buffer is made now
    pool.load(saved["llama"]["a"], name="a")  # evicts "c" and writes the slot outside inference mode
    for name in ("c", "a"):
        with torch.inference_mode(), pool.route(name):
            torch.testing.assert_close(model(**_inputs("llama")).logits, references["llama"][name], **TOL)
