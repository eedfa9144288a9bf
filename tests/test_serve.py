"""``adapterkit serve``: the real server on 127.0.0.1, spoken to by the openai client and raw HTTP.

Two servers run for the module (uvicorn on a thread, a free port each): a tiny Llama causal LM
with LoRA adapters (more than its pool has slots, so routing churns the LRU) and a label-word
adapter; and a tiny BERT classifier with LoRA adapters carrying their own heads. Every answer
is compared with a single-request reference computed with ``ak.load`` + ``ak.use`` on a fresh base.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch
import transformers as tf

import adapterkit as ak
from adapterkit.prompting import PromptTemplate, generate, score_label_words
from adapterkit.serve import add_parser, build_engine
from adapterkit.serve.app import BackgroundServer, create_app
from adapterkit.serve.command import parse_adapter
from adapterkit.serve.engine import GenerationJob, _safe_end
from tests.tiny import save_tiny

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["w5 w6 w7", "w9 w10", "w40 w41 w42 w43 w44", "w12"]
ADAPTERS = [f"a{i}" for i in range(6)]
SLOTS = 3  # fewer than the adapters: requests over all of them evict and bring back
MAX_TOKENS = 6
WORDS = ["w10", "w11"]
CHAT_TEMPLATE = "{% for m in messages %}w3 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w4{% endif %}"


def _perturbed_lora(base: str, folder, *, seed: int, task: str | None = None, recipe: dict | None = None) -> None:
    """Save a LoRA adapter whose B is not zero (a fresh one changes nothing), so each adapter answers its own way."""
    model, _ = ak.load_base(base, task=task)
    ak.attach(model, "lora", r=4, name="default")
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in ak.trainable_parameters(model, "default").items():
            p.add_(torch.randn_like(p) * (0.8 if "lora_B" in key else 0.3))
    ak.save(model, folder, recipe=recipe)


def _reference(base: str, folders: dict, **load_kwargs):
    """A fresh base with every adapter loaded by ak.load (for ak.use)."""
    model, tokenizer = ak.load_base(base, **load_kwargs)
    for name, folder in folders.items():
        ak.load(model, str(folder), name=name)
    return model.eval(), tokenizer


def _generate_ref(model, tokenizer, name, prompt, max_tokens=MAX_TOKENS) -> str:
    with ak.use(model, name):
        return generate(model, tokenizer, [prompt], max_new_tokens=max_tokens)[0]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """The causal-LM server, its adapter folders and the reference answers."""
    root = tmp_path_factory.mktemp("serve-llm")
    base = save_tiny("llama", root / "base")
    tokenizer = tf.AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    folders = {name: root / name for name in [*ADAPTERS, "late", "words"]}
    for seed, name in enumerate([*ADAPTERS, "late"], start=1):
        _perturbed_lora(base, folders[name], seed=seed)
    _perturbed_lora(base, folders["words"], seed=99,
                    recipe={"recipe": "fewshot_causal_lm", "label_words": WORDS, "label_names": ["neg", "pos"]})
    model, tok = _reference(base, folders)
    refs = {(n, p): _generate_ref(model, tok, n, p) for n in [*ADAPTERS, "late", None] for p in PROMPTS}
    for n in ADAPTERS[:2]:
        assert refs[(n, PROMPTS[0])] != refs[(None, PROMPTS[0])], "an adapter answers as the base: the test proves nothing"
    engine = build_engine(base, [f"{n}={folders[n]}" for n in [*ADAPTERS, "words"]], slots=SLOTS, max_rank=8,
                          batch_window_ms=20, max_batch_size=8, max_tokens_limit=32)
    server = BackgroundServer(create_app(engine, api_key=KEY)).start()
    yield {"url": server.url, "base": base, "folders": folders, "refs": refs, "model": model, "tok": tok,
           "engine": engine}
    server.stop()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The classification server (tiny BERT, LoRA adapters with their own heads) and references."""
    root = tmp_path_factory.mktemp("serve-cls")
    base = save_tiny("bert", root / "base")
    folders = {name: root / name for name in ("c0", "c1")}
    for seed, (name, folder) in enumerate(folders.items(), start=7):
        _perturbed_lora(base, folder, seed=seed, task="classification")
    model, tok = _reference(base, folders, task="classification")
    engine = build_engine(base, [f"{n}={f}" for n, f in folders.items()], slots=2, max_rank=8)
    server = BackgroundServer(create_app(engine)).start()
    yield {"url": server.url, "base": base, "model": model, "tok": tok}
    server.stop()


def _client(llm) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(llm, path, body, **kw) -> httpx.Response:
    return httpx.post(llm["url"] + path, json=body, headers=AUTH, timeout=60, **kw)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- the openai client -------------------------------------------------------------------------
def test_openai_client_completions_chat_and_models(llm):
    client = _client(llm)
    ids = {m.id for m in client.models.list().data}
    assert ids == {llm["base"], *ADAPTERS, "words"}
    for name in ("a0", "a1", llm["base"]):
        out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        adapter = None if name == llm["base"] else name
        assert out.choices[0].text == llm["refs"][(adapter, PROMPTS[0])]
        assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens <= MAX_TOKENS
    messages = [{"role": "user", "content": "w5 w6"}]
    out = client.chat.completions.create(model="a2", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    prompt = llm["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.choices[0].message.content == _generate_ref(llm["model"], llm["tok"], "a2", prompt)
    assert out.choices[0].message.role == "assistant"


def test_streaming_sends_the_same_text_in_chunks(llm):
    client = _client(llm)
    chunks = list(client.completions.create(model="a3", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks) == llm["refs"][("a3", PROMPTS[2])]
    messages = [{"role": "user", "content": "w7"}]
    stream = client.chat.completions.create(model="a1", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    prompt = llm["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == _generate_ref(llm["model"], llm["tok"], "a1", prompt)
    assert parts[-1].usage.completion_tokens >= 1
    # raw SSE framing: data lines and the closing [DONE]
    with httpx.stream("POST", llm["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "a0", "prompt": PROMPTS[1], "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_stop_strings_cut_the_text_also_when_streaming(llm):
    full = llm["refs"][("a0", PROMPTS[0])].split(" ")
    assert len(full) >= 3
    stop = " " + full[2]
    expected = " ".join(full[:2])
    client = _client(llm)
    out = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected
    # streaming holds back what may be the start of a stop string, and half-made characters
    assert _safe_end("abc w1", [" w12"]) == 3 and _safe_end("ab\ufffd", []) == 2 and _safe_end("abc", ["x"]) == 3


def test_sampling_is_reproducible_with_a_seed(llm):
    body = {"model": "a1", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.5, "top_p": 0.9, "seed": 5}
    first, second = (_post(llm, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2))
    assert first == second


def test_a_prompt_list_gets_one_choice_per_prompt(llm):
    out = _post(llm, "/v1/completions", {"model": "a4", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0})
    choices = out.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [llm["refs"][("a4", p)] for p in PROMPTS]


# --- concurrency -------------------------------------------------------------------------------
async def _many(llm, cases):
    async with httpx.AsyncClient(base_url=llm["url"], headers=AUTH, timeout=120) as client:
        async def one(name, prompt):
            r = await client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                           "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(n, p) for n, p in cases))


def test_concurrent_requests_over_many_adapters_each_get_their_own_answer(llm):
    stats = llm["engine"].pool.stats()
    cases = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate([*ADAPTERS, llm["base"]] * 4)]
    texts = asyncio.run(_many(llm, cases))
    for (name, prompt), text in zip(cases, texts):
        assert text == llm["refs"][(None if name == llm["base"] else name, prompt)], (name, prompt)
    after = llm["engine"].pool.stats()
    assert after["evictions"] > stats["evictions"], "six adapters over three slots must churn the LRU"
    text = httpx.get(llm["url"] + "/metrics", headers=AUTH).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    rows, batches = (float(samples[f'adapterkit_batch_rows_{k}{{kind="generate"}}']) for k in ("sum", "count"))
    assert rows > batches, "no request was batched with another"


def test_adapters_load_and_unload_while_requests_run(llm):
    stop = threading.Event()
    wrong: list = []

    def traffic():
        with httpx.Client(base_url=llm["url"], headers=AUTH, timeout=60) as client:
            while not stop.is_set():
                r = client.post("/v1/completions", json={"model": "a0", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                                                         "temperature": 0})
                if r.status_code != 200 or r.json()["choices"][0]["text"] != llm["refs"][("a0", PROMPTS[1])]:
                    wrong.append(r.text)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            r = _post(llm, "/v1/adapters", {"name": "late", "source": str(llm["folders"]["late"])})
            assert r.status_code == 200, r.text
            assert r.json()["name"] == "late"
            out = _post(llm, "/v1/completions", {"model": "late", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                                 "temperature": 0})
            assert out.json()["choices"][0]["text"] == llm["refs"][("late", PROMPTS[0])]
            assert httpx.delete(llm["url"] + "/v1/adapters/late", headers=AUTH, timeout=60).json()["deleted"] is True
            _error(_post(llm, "/v1/completions", {"model": "late", "prompt": PROMPTS[0]}), 404)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not wrong, wrong[:3]


# --- classification ----------------------------------------------------------------------------
def test_classify_with_classification_adapters(classifier):
    texts = ["w5 w6 w7", "w30 w31", "w9"]
    for name in ("c0", "c1"):
        r = httpx.post(classifier["url"] + "/v1/classify", json={"model": name, "input": texts}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        enc = classifier["tok"](texts, padding=True, return_tensors="pt")
        with ak.use(classifier["model"], name), torch.no_grad():
            probs = classifier["model"](**enc).logits.softmax(-1)
        for row, p in zip(data, probs):
            labels = list(row["scores"])
            assert labels == ak.get_adapter_record(classifier["model"], name).meta["label_names"]
            assert row["label"] == labels[int(p.argmax())]
            assert torch.allclose(torch.tensor(list(row["scores"].values())), p, atol=1e-4)
    # mixed: both adapters in one burst of concurrent requests
    with httpx.Client(base_url=classifier["url"], timeout=60) as client:
        single = {n: client.post("/v1/classify", json={"model": n, "input": "w5"}).json()["data"][0] for n in ("c0", "c1")}
    async def burst():
        async with httpx.AsyncClient(base_url=classifier["url"], timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/v1/classify", json={"model": n, "input": "w5"})
                                        for n in ["c0", "c1"] * 4))
            return [(n, r.json()["data"][0]) for n, r in zip(["c0", "c1"] * 4, rs)]
    for name, row in asyncio.run(burst()):
        assert row["label"] == single[name]["label"]
        assert row["scores"] == pytest.approx(single[name]["scores"], abs=1e-5)
    _error(httpx.post(classifier["url"] + "/v1/completions", json={"model": "c0", "prompt": "w5"}, timeout=60), 400)


def test_classify_with_label_words_of_a_causal_lm_adapter(llm):
    texts = ["w5 w6", "w20"]
    r = _post(llm, "/v1/classify", {"model": "words", "input": texts})
    assert r.status_code == 200, r.text
    model, tok = _reference(llm["base"], {"words": llm["folders"]["words"]})
    with ak.use(model, "words"):
        scores = score_label_words(model, tok, [PromptTemplate().render(t) for t in texts], WORDS).softmax(-1)
    for row, p in zip(r.json()["data"], scores):
        assert row["label"] == ["neg", "pos"][int(p.argmax())]
        assert [row["scores"]["neg"], row["scores"]["pos"]] == pytest.approx(p.tolist(), abs=1e-4)
    _error(_post(llm, "/v1/classify", {"model": "a0", "input": "w5"}), 400)  # a generation adapter records no words


# --- auth and errors ---------------------------------------------------------------------------
def test_api_key_is_required_except_for_health(llm):
    body = {"model": "a0", "prompt": "w5"}
    assert _error(httpx.post(llm["url"] + "/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    _error(httpx.post(llm["url"] + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    _error(httpx.post(llm["url"] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 401)
    _error(httpx.get(llm["url"] + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=llm["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(llm["url"] + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("body,status,code", [
    ({"model": "nope", "prompt": "w5"}, 404, "model_not_found"),
    ({"model": "a0", "prompt": "w5", "max_tokens": 33}, 400, "context_length_exceeded"),  # above --max-tokens-limit
    ({"model": "a0", "prompt": " ".join(["w5"] * 60), "max_tokens": 10}, 400, "context_length_exceeded"),  # > 64
    ({"model": "a0", "prompt": "w5", "n": 2}, 400, None),
    ({"model": "a0"}, 400, None),  # no prompt
    ({"model": "a0", "prompt": "w5", "temperature": -1}, 400, None),
    ({"model": "a0", "prompt": ""}, 400, None),
])
def test_bad_requests_get_openai_errors(llm, body, status, code):
    error = _error(_post(llm, "/v1/completions", body), status)
    assert error["code"] == code


def test_malformed_json_and_unknown_routes(llm):
    r = httpx.post(llm["url"] + "/v1/completions", content=b'{"model": "a0", "prompt": ', timeout=60,
                   headers={**AUTH, "content-type": "application/json"})
    assert _error(r, 400)["code"] == "invalid_json"
    _error(httpx.get(llm["url"] + "/v1/nothing", headers=AUTH), 404)
    with pytest.raises(openai.NotFoundError):
        _client(llm).completions.create(model="missing", prompt="w5", max_tokens=2)


def test_adapters_that_fail_to_load_are_refused_and_serving_goes_on(llm, tmp_path):
    assert _error(_post(llm, "/v1/adapters", {"name": "x", "source": str(tmp_path / "absent")}), 404)["param"] == "source"
    broken = tmp_path / "broken"
    _perturbed_lora(llm["base"], broken, seed=3)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])  # cut short: the manifest no longer matches
    assert _error(_post(llm, "/v1/adapters", {"name": "x", "source": str(broken)}), 400)["code"] == "adapter_load_failed"
    model, _ = ak.load_base(llm["base"])
    ak.attach(model, "prefix", num_virtual_tokens=2)
    prefix = ak.save(model, tmp_path / "prefix")  # the pool serves LoRA only: refused with a reason
    error = _error(_post(llm, "/v1/adapters", {"name": "x", "source": str(prefix)}), 400)
    assert "prefix" in error["message"]
    assert _error(_post(llm, "/v1/adapters", {"name": llm["base"], "source": str(llm["folders"]["late"])}), 400)
    _error(httpx.delete(llm["url"] + "/v1/adapters/never-loaded", headers=AUTH), 404)
    _error(_post(llm, "/v1/adapters", {"source": str(llm["folders"]["late"]), "name": "bad name!"}), 400)
    assert "x" not in {m["id"] for m in httpx.get(llm["url"] + "/v1/models", headers=AUTH).json()["data"]}
    out = _post(llm, "/v1/completions", {"model": "a0", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert out.json()["choices"][0]["text"] == llm["refs"][("a0", PROMPTS[0])]


def test_metrics_are_prometheus_text(llm):
    _post(llm, "/v1/completions", {"model": "a0", "prompt": "w5", "max_tokens": 2})
    r = httpx.get(llm["url"] + "/metrics", headers=AUTH)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert '# TYPE adapterkit_requests_total counter' in text
    assert 'adapterkit_requests_total{route="/v1/completions",status="200"}' in text
    assert 'adapterkit_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}' in text
    for key in ("hits", "misses", "evictions", "loads", "load_seconds"):
        assert f"adapterkit_pool_{key}_total " in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["adapterkit_pool_loads_total"]) >= len(ADAPTERS)


# --- the command line --------------------------------------------------------------------------
def test_serve_flags_and_adapter_names(tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--base", "smollm2-135m", "--adapter", "sst2=me/sst2-lora", "--adapter",
                              "./runs/x", "--slots", "8", "--api-key", "k", "--batch-window-ms", "2"])
    assert (args.slots, args.max_rank, args.host, args.port, args.api_key) == (8, 16, "127.0.0.1", 8000, "k")
    assert args.adapter == ["sst2=me/sst2-lora", "./runs/x"] and args.batch_window_ms == 2.0
    assert parse_adapter("sst2=me/sst2-lora") == ("sst2", "me/sst2-lora")
    assert parse_adapter("me/sst2-lora") == ("me/sst2-lora", "me/sst2-lora")
    (tmp_path / "x").mkdir()
    assert parse_adapter(str(tmp_path / "x")) == ("x", str(tmp_path / "x"))
    with pytest.raises(ak.InvalidOptionError):
        parse_adapter("name=")


def test_benchmark_quick_runs_on_a_tiny_model(llm, tmp_path):
    from benchmarks import serve as bench

    out = tmp_path / "serve.json"
    result = bench.main(["--quick", "--base", llm["base"], "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["scenarios"] and saved == json.loads(json.dumps(result))
    for row in saved["scenarios"]:
        assert row["requests"] > 0 and row["errors"] == 0 and row["p95_ms"] >= row["p50_ms"] > 0


def test_adapters_load_from_the_hub_by_repo_id(llm, hub_env):
    repo = hub_env.repo_id("served-lora")
    ak.publish(str(llm["folders"]["late"]), repo)
    r = _post(llm, "/v1/adapters", {"source": repo})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == repo  # a repo id serves under its own name unless one is given
    try:
        out = _client(llm).completions.create(model=repo, prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].text == llm["refs"][("late", PROMPTS[3])]
    finally:
        httpx.delete(f"{llm['url']}/v1/adapters/{repo}", headers=AUTH)
    assert _error(_post(llm, "/v1/adapters", {"source": hub_env.repo_id("never-published")}), 404)["param"] == "source"


def test_requests_join_a_running_generation_and_still_get_their_own_answer(llm):
    engine, refs = llm["engine"], {}
    long = next(((n, p) for n in ADAPTERS for p in PROMPTS
                 if len(_generate_ref(llm["model"], llm["tok"], n, p, 20).split()) == 20), None)
    assert long is not None, "every reference hit the end of sequence early: pick other seeds"
    refs[long] = _generate_ref(llm["model"], llm["tok"], *long, 20)
    late = [GenerationJob(name, engine.encode(prompt), MAX_TOKENS) for name, prompt in
            [("a1", PROMPTS[2]), ("a5", PROMPTS[3]), (None, PROMPTS[0])]]
    started = threading.Event()

    def first_text(_: str) -> None:
        # Called on the model thread mid-batch: these requests arrive while the long one generates.
        if not started.is_set():
            started.set()
            for job in late:
                engine.submit(job)

    joined = engine.metrics.joined.value()
    job = GenerationJob(long[0], engine.encode(long[1]), 20, on_text=first_text)
    assert engine.submit(job).result(timeout=60).text == refs[long]
    for lj, (name, prompt) in zip(late, [("a1", PROMPTS[2]), ("a5", PROMPTS[3]), (None, PROMPTS[0])]):
        assert lj.future.result(timeout=60).text == llm["refs"][(name, prompt)]
    assert engine.metrics.joined.value() > joined, "no request joined the running batch"


def test_gpt2_conv1d_base_generates_mixed_batches_like_the_reference(tmp_path):
    base = save_tiny("gpt2", tmp_path / "base")
    folders = {n: tmp_path / n for n in ("g0", "g1")}
    for seed, (name, folder) in enumerate(folders.items(), start=11):
        _perturbed_lora(base, folder, seed=seed)
    model, tok = _reference(base, folders)
    engine = build_engine(base, [f"{n}={f}" for n, f in folders.items()], slots=2, max_rank=8, batch_window_ms=50)
    try:
        cases = [(n, p) for n in ("g0", "g1", None) for p in PROMPTS[:3]]
        jobs = [GenerationJob(n, engine.encode(p), MAX_TOKENS) for n, p in cases]
        for job in jobs:
            engine.submit(job)
        for job, (name, prompt) in zip(jobs, cases):
            assert job.future.result(timeout=60).text == _generate_ref(model, tok, name, prompt), (name, prompt)
    finally:
        engine.close()
