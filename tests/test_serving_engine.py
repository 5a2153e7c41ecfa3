"""The engine without HTTP: batching must not change answers, adapters must be the ones asked for,
and adapter admin must be safe while requests run."""

from __future__ import annotations

import dataclasses
import queue
import random
import time

import pytest
import torch
from peft import PeftModel

from looprl.policy.model import load_base
from looprl.serving.adapters import AdapterError, read_adapter
from looprl.serving.app import http_status
from looprl.serving.engine import Engine, EngineError, Finished, _Request
from looprl.serving.kv import left_pad
from looprl.serving.sampling import RowSampler, SamplingParams, sample_next, top_p_filter

from fixtures_serving import MAX_LORA_RANK

PROMPTS = [
    "hello world",
    "the cat sat on the mat and looked",
    "question: what is the capital",
    "I love",
    "numbers: one two three four five six seven",
    "x",
]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def _engine(base, adapters, mixed: bool) -> Engine:
    torch.set_num_threads(1)
    model, tok = load_base(base)
    eng = Engine(model, tok, max_batch_size=16, max_queue=64, max_lora_rank=MAX_LORA_RANK, max_loras=4,
                 base_checksum=adapters.checksum, mixed=mixed).start()
    for name, v in (("a1", adapters.good[0]), ("a2", adapters.good[1]), ("experts", adapters.experts_only)):
        eng.load_adapter(read_adapter(name, f"policy/{v}", adapters.registry, eng.inventory, MAX_LORA_RANK))
    return eng


@pytest.fixture(scope="module")
def engine(serving_base, serving_adapters):
    """The default engine: rows on different adapters share one forward (mixed mode)."""
    eng = _engine(serving_base, serving_adapters, mixed=True)
    yield eng
    eng.stop()


@pytest.fixture(scope="module", params=["mixed", "grouped"])
def any_engine(request, engine, serving_base, serving_adapters):
    """Both batching strategies: mixed-adapter forwards, and one cohort + forward per adapter."""
    if request.param == "mixed":
        yield engine
        return
    eng = _engine(serving_base, serving_adapters, mixed=False)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def reference(serving_base, serving_adapters):
    """Greedy text by an independent loop: full recompute every token, no KV cache, no padding,
    plain peft model per adapter."""
    base, tok = load_base(serving_base)
    models = {None: base}
    for name, v in (("a1", serving_adapters.good[0]), ("experts", serving_adapters.experts_only)):
        models[name] = PeftModel.from_pretrained(load_base(serving_base)[0], serving_adapters.registry / "policy" / v).eval()
    cache: dict = {}

    def run(prompt: str, adapter: str | None = None, max_tokens: int = GREEDY.max_tokens) -> str:
        key = (prompt, adapter, max_tokens)
        if key not in cache:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            out: list[int] = []
            with torch.no_grad():
                for _ in range(max_tokens):
                    t = int(models[adapter](torch.tensor([ids + out])).logits[0, -1].argmax())
                    if t == tok.eos_token_id:
                        break
                    out.append(t)
            cache[key] = tok.decode(out, skip_special_tokens=True)
        return cache[key]

    return run


def _collect(box: queue.Queue, timeout: float = 60.0):
    deltas = []
    while True:
        kind, payload = box.get(timeout=timeout)
        if kind == "done":
            return payload, "".join(deltas)
        deltas.append(payload)


def _submit_all(engine, jobs, stagger: float = 0.0):
    boxes = []
    for prompt, adapter, params in jobs:
        box: queue.Queue = queue.Queue()
        engine.submit(engine.encode(prompt), params, adapter, box.put)
        boxes.append(box)
        if stagger:
            time.sleep(stagger)
    return [_collect(b) for b in boxes]


def test_batched_greedy_equals_unbatched_reference(engine, reference):
    results = _submit_all(engine, [(p, None, GREEDY) for p in PROMPTS])
    for p, (fin, streamed) in zip(PROMPTS, results):
        assert fin.text == reference(p), p
        assert streamed == fin.text  # the stream adds up to the answer
        assert fin.version == "base"


def test_requests_joining_mid_batch_with_mixed_adapters_match_reference(any_engine, reference):
    engine = any_engine
    # Different lengths, adapters and max_tokens; submitted while earlier ones are decoding,
    # so they join running cohorts at step boundaries and leave them at different times.
    jobs = [(p, a, SamplingParams(max_tokens=6 + (i % 5), temperature=0.0))
            for i, (p, a) in enumerate((p, a) for a in (None, "a1", "experts") for p in PROMPTS)]
    results = _submit_all(engine, jobs, stagger=0.002)
    for (p, a, params), (fin, _) in zip(jobs, results):
        assert fin.text == reference(p, a, params.max_tokens), (p, a)
        assert fin.adapter == a


def test_adapters_change_answers_and_report_their_version(engine, serving_adapters):
    base = [engine.generate(p, GREEDY) for p in PROMPTS]
    a1 = [engine.generate(p, GREEDY, adapter="a1") for p in PROMPTS]
    a2 = [engine.generate(p, GREEDY, adapter="a2") for p in PROMPTS]
    ex = [engine.generate(p, GREEDY, adapter="experts") for p in PROMPTS]
    assert sum(x.text != y.text for x, y in zip(base, a1)) >= len(PROMPTS) // 2
    assert sum(x.text != y.text for x, y in zip(a1, a2)) >= len(PROMPTS) // 2
    assert sum(x.text != y.text for x, y in zip(base, ex)) >= 1  # LoRA on fused MoE experts only
    assert {f.version for f in a1} == {serving_adapters.good[0]}
    assert {f.version for f in ex} == {serving_adapters.experts_only}


def test_max_tokens_and_stop_strings(engine):
    fin = engine.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0))
    if fin.finish_reason == "length":
        assert fin.completion_tokens == 5
    full = engine.generate(PROMPTS[2], SamplingParams(max_tokens=12, temperature=0.0)).text
    cut = next((i for i in range(1, len(full)) if full[i:i + 2].strip()), None)
    if cut is None:
        pytest.skip("greedy answer too short to pick a stop string from")
    stop = full[cut:cut + 2]
    box: queue.Queue = queue.Queue()
    engine.submit(engine.encode(PROMPTS[2]), SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)), None, box.put)
    fin, streamed = _collect(box)
    assert fin.finish_reason == "stop"
    assert fin.text == full[: full.index(stop)]
    assert stop not in streamed and streamed == fin.text  # held-back prefixes never leak


UNICODE = ["héllo wörld, naïve café", "日本語のテキスト 🙂🙃", "mixed: ünïcödé — “quotes” and 中文 ok"]


def _feed(engine: Engine, ids: list[int], params: SamplingParams, check: bool = True) -> tuple[Finished, list[str]]:
    """Run ``ids`` through the engine's text path as if it had sampled them: the answer and the
    deltas it streamed. ``check``: after every token, that nothing streamed is ever taken back."""
    events: list = []
    req = _Request(0, [engine.pad_id], params, None, events.append)
    for n, token in enumerate(ids, 1):
        done = engine._on_token(req, token, 0.0, [])  # the text path only: any log-prob
        sent = "".join(p for kind, p in events if kind == "delta")
        assert not check or engine.tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(sent), sent
        if done:
            break
    kind, fin = events[-1]
    assert kind == "done"
    return fin, [p for kind, p in events if kind == "delta"]


def test_streamed_deltas_add_up_to_the_full_decode(engine):
    tok = engine.tokenizer
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in UNICODE]
    # Byte-level BPE: these characters span several tokens, each of which alone is an incomplete sequence.
    assert all(any(tok.decode([i]) == "\ufffd" for i in ids) for ids in texts)
    rng = random.Random(0)
    noise = [[rng.randrange(len(tok)) for _ in range(48)] for _ in range(20)]  # stray bytes, special tokens
    for ids in texts + noise:
        fin, deltas = _feed(engine, ids, SamplingParams(max_tokens=len(ids), ignore_eos=True))
        assert fin.finish_reason == "length" and fin.completion_tokens == len(ids)
        assert "".join(deltas) == fin.text == tok.decode(ids, skip_special_tokens=True)


def test_stop_strings_cut_the_incremental_text_exactly(engine):
    tok = engine.tokenizer
    ids = tok("the cat sat on the mat, 日本 and wörld again", add_special_tokens=False)["input_ids"]
    full = tok.decode(ids)
    for stops in [("日本",), ("örl",), ("t o",), ("again",), ("again", "sat"), ("mat!", "wörld")]:
        fin, deltas = _feed(engine, ids, SamplingParams(max_tokens=len(ids), ignore_eos=True, stop=stops))
        cut = min(full.index(s) for s in stops if s in full)
        assert fin.finish_reason == "stop" and "".join(deltas) == fin.text == full[:cut], stops
        # it stopped at the first token whose text completes a stop string
        assert fin.completion_tokens == next(n for n in range(1, len(ids) + 1)
                                             if any(s in tok.decode(ids[:n]) for s in stops))
    # "mat!" never occurs: its prefixes "m", "ma", "mat" are held back, never streamed at the end
    # of a delta, and sent once the text goes on differently; the answer is the whole text.
    fin, deltas = _feed(engine, ids, SamplingParams(max_tokens=len(ids), ignore_eos=True, stop=("mat!",)))
    assert fin.finish_reason == "length" and "".join(deltas) == fin.text == full
    assert not [d for d in deltas if d.endswith(("m", "ma", "mat"))]
    assert any("mat," in d for d in deltas)


def test_decoding_a_token_costs_the_same_at_any_answer_length(engine):
    class Counting:
        """The engine's tokenizer, recording how many ids each decode call gets."""

        def __init__(self, tok):
            self.tok, self.sizes = tok, []

        def decode(self, ids, **kw):
            self.sizes.append(len(ids))
            return self.tok.decode(ids, **kw)

    tok = engine.tokenizer
    ids = tok(" ".join(UNICODE * 12), add_special_tokens=False)["input_ids"]
    counting = Counting(tok)
    engine.tokenizer = counting
    try:
        fin, deltas = _feed(engine, ids, SamplingParams(max_tokens=len(ids), ignore_eos=True), check=False)
    finally:
        engine.tokenizer = tok
    assert len(ids) > 300 and fin.text == tok.decode(ids)
    per_token, final = counting.sizes[:-1], counting.sizes[-1]
    assert final == len(ids)  # one full decode, at the finish
    assert max(per_token) <= 8  # a short window of ids per token, however long the answer


def test_sampled_streams_add_up_to_the_answer_and_stop_where_the_answer_does(engine):
    jobs = [(p, None, SamplingParams(max_tokens=32, temperature=2.0, seed=s, ignore_eos=True))
            for p in PROMPTS[:3] for s in (1, 2, 3)]
    results = _submit_all(engine, jobs)
    for fin, streamed in results:
        assert fin.finish_reason == "length" and fin.completion_tokens == 32
        assert streamed == fin.text  # incremental deltas == one full decode at the finish
    assert len({fin.text for fin, _ in results}) == len(jobs)
    params = SamplingParams(max_tokens=24, temperature=1.5, seed=7, ignore_eos=True)
    full = engine.generate(PROMPTS[1], params).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    (fin, streamed), = _submit_all(engine, [(PROMPTS[1], None, dataclasses.replace(params, stop=(stop,)))])
    assert fin.finish_reason == "stop" and streamed == fin.text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate(PROMPTS[1], params).text
    noisy = [(p, None, SamplingParams(max_tokens=12, temperature=1.0)) for p in PROMPTS]
    results = _submit_all(engine, noisy[:3] + [(PROMPTS[1], None, params)] + noisy[3:])
    assert results[3][0].text == alone
    other = engine.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99)).text
    assert other != alone


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = top_p_filter(logits, torch.tensor([0.7, 1.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).all()
    rows = [RowSampler.create(SamplingParams(temperature=0.0)), RowSampler.create(SamplingParams(temperature=0.5, top_p=0.7))]
    # Both rows on the skewed distribution: at temperature 0.5 its 0.7-nucleus is tokens {0, 1}
    # (on the uniform row a three-way tie survives top-p, and the unseeded draw may pick token 2).
    picks = sample_next(logits[[0, 0]], rows)
    assert picks[0] == 0 and picks[1] in (0, 1)


def test_left_pad_positions_count_real_tokens_only():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos[:, -1].tolist() == [2, 0]


def test_unload_waits_for_in_flight_requests(engine, serving_adapters, reference):
    spec = read_adapter("tmp-a", f"policy/{serving_adapters.good[0]}", serving_adapters.registry, engine.inventory,
                        MAX_LORA_RANK)
    key = engine.load_adapter(spec).key
    box: queue.Queue = queue.Queue()
    long = SamplingParams(max_tokens=40, temperature=0.0)
    engine.submit(engine.encode(PROMPTS[0]), long, "tmp-a", box.put)
    time.sleep(0.01)
    engine.unload_adapter("tmp-a")
    assert engine.resolve("tmp-a") is None  # hidden at once: new requests cannot pick it
    with pytest.raises(EngineError) as e:
        engine.submit(engine.encode(PROMPTS[0]), GREEDY, "tmp-a", lambda ev: None)
    assert e.value.reason == "unknown_model" and http_status(e.value.reason) == 404
    fin, _ = _collect(box)
    assert fin.finish_reason in ("stop", "length") and fin.adapter == "tmp-a"
    assert fin.text == reference(PROMPTS[0], "a1", 40)  # finished on the adapter it started with
    deadline = time.monotonic() + 5
    while engine.draining() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.draining()
    names = [n for n, _ in engine.model.named_parameters()]
    assert not any(f".{key}." in n for n in names)  # its weights are gone from the model
    assert any(f".{engine.resolve('a1').key}." in n for n in names)  # the others are not


def test_adapter_admin_refusals_leave_the_engine_unchanged(engine, serving_adapters):
    before = sorted(a.name for a in engine.adapters())
    reg = serving_adapters.registry
    with pytest.raises(AdapterError, match="rank 16 exceeds serving.max_lora_rank=8"):
        read_adapter("big", f"policy/{serving_adapters.too_large}", reg, engine.inventory, MAX_LORA_RANK)
    with pytest.raises(AdapterError, match="missing_proj"):
        read_adapter("inc", f"policy/{serving_adapters.incompatible}", reg, engine.inventory, MAX_LORA_RANK)
    with pytest.raises(AdapterError, match="checksum mismatch for adapter_model.safetensors"):
        read_adapter("bad", f"policy/{serving_adapters.tampered}", reg, engine.inventory, MAX_LORA_RANK)
    with pytest.raises(AdapterError, match="outside the registry root") as e:
        read_adapter("evil", "../../etc", reg, engine.inventory, MAX_LORA_RANK)
    assert e.value.reason == "outside_registry" and http_status(e.value.reason) == 403
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter(read_adapter("a1", f"policy/{serving_adapters.good[2]}", reg, engine.inventory, MAX_LORA_RANK))
    spec = read_adapter("fifth", f"policy/{serving_adapters.good[2]}", reg, engine.inventory, MAX_LORA_RANK)
    engine.load_adapter(spec)  # 4 = max_loras
    with pytest.raises(AdapterError, match="max_loras"):
        engine.load_adapter(read_adapter("sixth", f"policy/{serving_adapters.good[2]}", reg, engine.inventory,
                                         MAX_LORA_RANK))
    engine.unload_adapter("fifth")
    assert sorted(a.name for a in engine.adapters()) == before
    assert engine.generate(PROMPTS[0], GREEDY, adapter="a1").finish_reason in ("stop", "length")


def test_bad_requests_are_refused_with_the_field_named(engine):
    with pytest.raises(EngineError, match="prompt has"):
        engine.submit(list(range(1, 10)) * 100, GREEDY, None, lambda ev: None)
    with pytest.raises(EngineError, match="not loaded"):
        engine.submit([1, 2], GREEDY, "nope", lambda ev: None)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_queue_full_is_503(serving_base):
    model, tok = load_base(serving_base)
    eng = Engine(model, tok, max_batch_size=1, max_queue=2).start()
    try:
        with eng._model_lock:  # the scheduler admits one request, then blocks on its forward
            eng.submit([1, 2, 3], GREEDY, None, lambda ev: None)
            deadline = time.monotonic() + 10
            while eng.stats()["waiting"] and time.monotonic() < deadline:
                time.sleep(0.01)
            for _ in range(2):
                eng.submit([1, 2, 3], GREEDY, None, lambda ev: None)
            with pytest.raises(EngineError, match="overloaded") as e:
                eng.submit([1, 2, 3], GREEDY, None, lambda ev: None)
            assert e.value.reason == "overloaded" and http_status(e.value.reason) == 503
    finally:
        eng.stop()


def test_a_failing_forward_fails_its_requests_and_the_engine_keeps_serving(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "forward", boom)
    fin = engine.generate(PROMPTS[0], GREEDY, adapter="a1", timeout=30)
    assert fin.finish_reason == "error" and "boom" in fin.error
    assert engine.resolve("a1").in_flight == 0  # the adapter is not pinned by a dead request
    monkeypatch.undo()
    assert engine.generate(PROMPTS[0], GREEDY, adapter="a1").finish_reason in ("stop", "length")


def test_a_request_refused_at_submit_leaves_no_in_flight_count(engine, serving_adapters):
    """torch refuses a seed >= 2**64 while the request is created: before, the adapter's in-flight
    count stayed up, and once unloaded the adapter was draining forever."""
    engine.load_adapter(read_adapter("seed-a", f"policy/{serving_adapters.good[2]}", serving_adapters.registry,
                                     engine.inventory, MAX_LORA_RANK))
    bad = SamplingParams(max_tokens=4, temperature=1.0, seed=2**64)
    with pytest.raises(ValueError, match="Overflow"):
        engine.submit(engine.encode(PROMPTS[0]), bad, "seed-a", lambda ev: None)
    assert engine.resolve("seed-a").in_flight == 0 and engine.stats()["waiting"] == 0
    engine.unload_adapter("seed-a")
    deadline = time.monotonic() + 5
    while engine.draining() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.draining()  # its weights were deleted
