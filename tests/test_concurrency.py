"""Which adapter a forward uses is the caller's own: real threads and asyncio tasks at once.

A catalog of cases: concurrent ``with use()`` over every strategy that shares a base,
concurrent and nested mixed batches, generation, the model-wide default under concurrent
switches, copies of a routed model, and the bookkeeping that must not leak.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
import threading

import pytest
import torch

import adapterkit as ak
from adapterkit import routing
from adapterkit.state import get_store
from tests.test_artifacts import fresh, logits, trained
from tests.tiny import make_batch

ROUNDS = 40


def _run_threads(targets) -> list[BaseException]:
    """Start every target at once (a barrier), join them, and return what they raised."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as err:  # noqa: BLE001 - reported to the test
                errors.append(err)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


@pytest.fixture(scope="module")
def bert_many():
    """One BERT base with two LoRA adapters, a prefix and a head adapter, and the logits of each."""
    model = fresh("bert")
    trained("bert", "lora", name="a", model=model, seed=1)
    trained("bert", "lora", name="b", model=model, seed=2)
    trained("bert", "prefix", name="p", model=model, seed=3)
    trained("bert", "head", name="h", model=model, seed=4)
    model.eval()
    batch = {k: v for k, v in make_batch("bert", batch_size=4).items() if k != "labels"}
    expected = {}
    for name in ["a", "b", "p", "h", None]:
        ak.use(model, name)
        expected[name] = logits(model, batch)
    ak.use(model, "a")
    for x, y in [(n, m) for n in expected for m in expected if n != m]:
        assert not torch.allclose(expected[x], expected[y]), f"{x} and {y} give the same logits: the test would prove nothing"
    return model, batch, expected


@pytest.mark.parametrize("names", [["a", "b"], ["a", "p"], ["a", "h"], ["p", "h"], ["a", "b", "p", "h", None]])
def test_concurrent_use_blocks_each_see_their_adapter(bert_many, names):
    model, batch, expected = bert_many
    wrong: list[str] = []

    def worker(name):
        def run():
            for _ in range(ROUNDS):
                with ak.use(model, name):
                    with torch.no_grad():
                        out = model(**batch).logits
                    assert ak.get_active_adapter(model) == name
                if not torch.allclose(out, expected[name], rtol=1e-5, atol=1e-5):
                    wrong.append(str(name))

        return run

    errors = _run_threads([worker(n) for n in names])
    assert not errors, errors
    assert not wrong, f"{len(wrong)} of {ROUNDS * len(names)} forwards used another adapter: {sorted(set(wrong))}"
    assert ak.get_active_adapter(model) == "a"  # the default never moved


def test_default_is_what_threads_without_a_choice_see(bert_many):
    model, batch, expected = bert_many
    seen = {}

    def other():
        with torch.no_grad():
            seen["logits"] = model(**batch).logits
        seen["active"] = ak.get_active_adapter(model)

    ak.use(model, "b")  # a statement sets the model-wide default
    try:
        with ak.use(model, "h"):  # a block is this thread's own: another thread still sees "b"
            assert ak.get_active_adapter(model) == "h"
            t = threading.Thread(target=other)
            t.start()
            t.join()
        assert seen["active"] == "b"
        torch.testing.assert_close(seen["logits"], expected["b"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(model, batch), expected["b"], rtol=1e-5, atol=1e-5)
    finally:
        ak.use(model, "a")


def test_statement_use_inside_a_block_lasts_until_the_block_ends(bert_many):
    model, batch, expected = bert_many
    with ak.use(model, "b"):
        ak.use(model, "p")
        assert ak.get_active_adapter(model) == "p"
        torch.testing.assert_close(logits(model, batch), expected["p"], rtol=1e-5, atol=1e-5)
    # the statement also set the default; the block's own choice ended with the block
    assert ak.get_active_adapter(model) == "p"
    ak.use(model, "a")


def test_concurrent_statement_switches_never_mix_layers(bert_many):
    model, batch, expected = bert_many
    names = ["a", "b", "p", "h", None]

    def flipper(i):
        def run():
            for r in range(ROUNDS):
                ak.use(model, names[(i + r) % len(names)])

        return run

    assert not _run_threads([flipper(i) for i in range(4)])
    final = ak.get_active_adapter(model)
    actives = {tuple(layer.__dict__["_active_adapter"]) for _, layer in get_store(model).extra["lora_layers"]}
    assert len(actives) == 1  # every layer agrees on the default
    torch.testing.assert_close(logits(model, batch), expected[final], rtol=1e-5, atol=1e-5)
    ak.use(model, "a")


def test_interleaved_blocks_restore_the_default():
    """Two blocks whose switches interleave: the default comes back to what it was before both."""
    model = fresh("llama")
    for name in ("a", "b", "c"):
        ak.attach(model, "lora", name=name, r=2)
    ak.use(model, "c")
    first, second = ak.use(model, "a"), ak.use(model, "b")  # switched, not yet entered
    with first:
        assert ak.get_active_adapter(model) == "a"
        with second:
            assert ak.get_active_adapter(model) == "b"
    assert ak.get_active_adapter(model) == "c"
    assert get_store(model).active == "c"
    # a statement switch in between stays
    first = ak.use(model, "a")
    ak.use(model, "b")
    with first:
        pass
    assert get_store(model).active == "b"


def _llama_two_loras(batch_size: int):
    """A Llama base with LoRA adapters "a" and "b", a batch, and each adapter's (and the base's) logits."""
    model = fresh("llama")
    trained("llama", "lora", name="a", model=model, seed=1)
    trained("llama", "lora", name="b", model=model, seed=2)
    batch = {k: v for k, v in make_batch("llama", batch_size=batch_size).items() if k != "labels"}
    single = {}
    for name in ("a", "b", None):
        ak.use(model, name)
        single[name] = logits(model, batch)
    return model, batch, single


@pytest.mark.parametrize("rows_by_thread", [[["a", "b", None, "a"], ["b", "a", "a", None]], [["a"] * 4, ["b"] * 4, [None] * 4]])
def test_concurrent_mixed_batches(rows_by_thread):
    model, batch, single = _llama_two_loras(4)
    ak.use(model, "a")
    wrong = []

    def worker(rows):
        want = torch.stack([single[n][i] for i, n in enumerate(rows)])

        def run():
            for _ in range(ROUNDS // 2):
                with ak.mixed_batch(model, rows), torch.no_grad():
                    out = model(**batch).logits
                if not torch.allclose(out, want, rtol=1e-5, atol=1e-5):
                    wrong.append(rows)

        return run

    errors = _run_threads([worker(r) for r in rows_by_thread])
    assert not errors, errors
    assert not wrong


def test_nested_mixed_batch_and_use():
    model, batch, single = _llama_two_loras(2)
    ak.use(model, None)
    store = get_store(model)
    with ak.mixed_batch(model, ["a", "b"]):
        outer = logits(model, batch)
        with ak.mixed_batch(model, ["b", None]):
            inner = logits(model, batch)
            with ak.use(model, "a"):
                innermost = logits(model, batch)
            assert routing.current(store).rows == ("b", None)
        again = logits(model, batch)
    assert routing.current(store) is None
    torch.testing.assert_close(outer, torch.stack([single["a"][0], single["b"][1]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inner, torch.stack([single["b"][0], single[None][1]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(innermost, single["a"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, outer)
    torch.testing.assert_close(logits(model, batch), single[None], rtol=1e-5, atol=1e-5)


def test_mixed_batch_under_an_active_prefix_leaves_it_out():
    """Rows of a mixed batch are LoRA adapters or the base: the default's prefix must not apply."""
    model = fresh("bert")
    trained("bert", "lora", name="a", model=model, seed=1)
    trained("bert", "prefix", name="p", model=model, seed=2)
    batch = {k: v for k, v in make_batch("bert", batch_size=2).items() if k != "labels"}
    ak.use(model, "a")
    want_a = logits(model, batch)
    ak.use(model, None)
    want_base = logits(model, batch)
    ak.use(model, "p")
    with ak.mixed_batch(model, ["a", None]):
        got = logits(model, batch)
    torch.testing.assert_close(got, torch.stack([want_a[0], want_base[1]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [("a", "as a list"), ([], "empty"), ([3], "strings or None"), (["nope"], "No adapter named 'nope'")])
def test_mixed_batch_bad_names(bad, match):
    model = fresh("llama")
    ak.attach(model, "lora", name="a", r=2)
    with pytest.raises(ak.AdapterKitError, match=match):
        with ak.mixed_batch(model, bad):
            pass
    assert routing.current(get_store(model)) is None


def test_mixed_batch_with_wrong_row_count_is_a_clear_error():
    model = fresh("bert")
    trained("bert", "lora", name="a", model=model)
    batch = {k: v for k, v in make_batch("bert", batch_size=4).items() if k != "labels"}
    with ak.mixed_batch(model, ["a", None]):
        with pytest.raises(ak.IncompatibleModelError, match="names 2 adapters but the batch has 4 rows"):
            logits(model, batch)


def test_concurrent_generation():
    model = fresh("gpt2")
    trained("gpt2", "lora", name="a", model=model, seed=1)
    trained("gpt2", "prefix", name="p", model=model, seed=2)
    ids = make_batch("gpt2", batch_size=1)["input_ids"]
    want = {}
    for name in ("a", "p", None):
        ak.use(model, name)
        want[name] = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ak.use(model, None)
    wrong = []

    def worker(name):
        def run():
            for _ in range(5):
                with ak.use(model, name):
                    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
                if not torch.equal(out, want[name]):
                    wrong.append(name)

        return run

    assert not _run_threads([worker(n) for n in ("a", "p", None)])
    assert not wrong


def test_asyncio_tasks_each_see_their_adapter(bert_many):
    model, batch, expected = bert_many

    async def task(name):
        wrong = 0
        for _ in range(10):
            with ak.use(model, name):
                await asyncio.sleep(0)  # let the other tasks switch in between
                with torch.no_grad():
                    out = model(**batch).logits
            wrong += not torch.allclose(out, expected[name], rtol=1e-5, atol=1e-5)
        return wrong

    async def main():
        return await asyncio.gather(*(task(n) for n in ["a", "b", "p", "h"]))

    assert asyncio.run(main()) == [0, 0, 0, 0]


def test_a_copied_model_is_routed_on_its_own(bert_many):
    model, batch, expected = bert_many
    twin = copy.deepcopy(model)
    assert get_store(twin).key != get_store(model).key
    with ak.use(model, "b"):
        torch.testing.assert_close(logits(twin, batch), expected["a"], rtol=1e-5, atol=1e-5)  # twin keeps its default
    with ak.use(twin, "h"):
        torch.testing.assert_close(logits(twin, batch), expected["h"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(model, batch), expected["a"], rtol=1e-5, atol=1e-5)
    revived = pickle.loads(pickle.dumps(model))
    with ak.use(revived, "p"):
        torch.testing.assert_close(logits(revived, batch), expected["p"], rtol=1e-5, atol=1e-5)


def test_detaching_everything_gives_back_plain_modules():
    model = fresh("bert")
    classifier_type = type(model.classifier)
    ak.attach(model, "lora", name="a", r=2)
    ak.attach(model, "head", name="h")
    assert type(model.classifier).__name__ == classifier_type.__name__
    assert isinstance(model.classifier, classifier_type)
    ak.detach(model, "a")
    ak.detach(model, "h")
    assert type(model.classifier) is classifier_type
    assert "_adapterkit_store" not in model.classifier.__dict__


def test_summary_reports_the_active_adapters_parameters():
    model = fresh("bert")
    ak.attach(model, "lora", name="a", r=2)
    ak.attach(model, "lora", name="wide", r=8)
    per = {a.name: a.parameters for a in ak.summary(model).adapters}
    ak.use(model, "a")
    assert ak.summary(model).trainable_parameters == per["a"]
    with ak.use(model, "wide"):
        assert ak.summary(model).trainable_parameters == per["wide"]
        assert [a.name for a in ak.summary(model).adapters if a.active] == ["wide"]
    options = {a.name: a.options for a in ak.summary(model).adapters}
    assert options["a"]["lora_alpha"] == 4 and options["wide"]["lora_alpha"] == 16  # the value in effect
