"""The local engine on the real embedded model (no mocks): DSPy integration, stop strings,
max_tokens, usage, threads, async, LoRA adapters chosen by model id, saving, errors; batching and
shared-prefix reuse give the same greedy outputs as neither (float32), per-row stops in a batch,
and no prefix cached for one adapter's weights is ever used with others.

    .venv/bin/python -m pytest tests/test_engine.py -q
    JOINTOPT_CPU_BF16=0 .venv/bin/python -m pytest tests/test_engine.py -q   # the fp32 path on a bf16 CPU

Most tests use a float32 engine: there batching changes only rounding, so outputs can be compared
exactly. The default engine (bf16 on CPUs with avx512_bf16 or AMX, else fp32) is checked for
sharing; its bf16 path only where bf16 is native (JOINTOPT_CPU_BF16=0 forces the fp32 path).

The first run on a machine converts the embedded model into ~/.cache/jointopt (about 20 s more).
"""

import asyncio
import copy
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import dspy
import pytest
from dspy.lm15 import Config, Message, Request

from jointcli.errors import InputError, StepError
from jointcli.inference.engine import AsyncLocalEngine, LocalEngine, get_engine
from jointcli.inference.model_id import adapter_model_id
from jointcli.models import build_lm
from jointcli.models.pool import ModelPool
from jointcli.models.remote import server_failure
from jointcli.recipe import EMBEDDED_MODEL, LiteLLMModel, LocalModel, load_recipe
from jointcli.recipe.sections import EngineLimits
from jointcli.weights.checkpoint import resolve_checkpoint

from .conftest import RECIPES, requires_native_bf16

pytestmark = pytest.mark.model  # every test here runs the embedded model

DEMOS = [
    dspy.Example(question="What is the capital of Italy?", answer="Rome"),
    dspy.Example(question="What is the capital of Spain?", answer="Madrid"),
]
PROMPTS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello in French."]


@pytest.fixture(scope="module")
def lm():
    return build_lm("smollm2", LocalModel(max_tokens=8, dtype="float32"), cache=False)


@pytest.fixture(scope="module")
def engine(lm):
    return lm.engine


def ask(engine, text, model="local/smollm2", **config):
    return engine.complete(Request(model=model, messages=(Message.user(text),), config=Config(**config)))


def cpu_bf16_by_hand() -> bool:
    """Whether `dtype: auto` must pick bf16 on this CPU, read here from the switch and /proc/cpuinfo
    (not through weights/device.py, whose answer the test checks)."""
    switch = os.environ.get("JOINTOPT_CPU_BF16", "")
    if switch in ("0", "1"):
        return switch == "1"
    with open("/proc/cpuinfo") as f:
        flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_build_lm_shares_one_engine(lm, engine):
    import torch

    assert isinstance(engine, LocalEngine) and isinstance(lm._async_engine_spec, AsyncLocalEngine)
    assert get_engine(EMBEDDED_MODEL, "float32", "cpu") is engine
    assert build_lm("other", LocalModel(dtype="float32")).engine is engine
    default = build_lm("default", LocalModel()).engine
    assert default is get_engine(EMBEDDED_MODEL, "auto", "auto")
    assert default.dtype == (torch.bfloat16 if cpu_bf16_by_hand() else torch.float32)
    # auto is float32 on a CPU without native bf16 (or with JOINTOPT_CPU_BF16=0): the same weights then
    assert (default is engine) == (default.dtype == torch.float32)
    assert lm.model == "local/smollm2" and lm.kwargs["temperature"] == 0.0


@requires_native_bf16
def test_bf16_engine_answers_concurrent_callers():
    """The bf16 default: batched answers may differ from lone ones by rounding (fp32 equality is
    tested below), but every caller gets the answer to its own question, whatever the model knows:
    each concurrent answer is closer to its own lone answer than to any other."""
    from difflib import SequenceMatcher

    import torch

    default = build_lm("default", LocalModel(max_tokens=12), cache=False)
    assert default.engine.dtype == torch.bfloat16
    questions = [f"What is the capital of {c}?" for c in ("France", "Italy", "Japan", "England")]
    lone = [default(q)[0] for q in questions]
    assert len(set(lone)) == len(lone), lone
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: default(q)[0], questions))
    for i, answer in enumerate(answers):
        closest = max(range(len(lone)), key=lambda j: SequenceMatcher(None, answer, lone[j]).ratio())
        assert closest == i, (answers, lone)


def test_predict_through_chat_adapter(lm):
    predict = dspy.Predict("question -> answer")
    predict.demos = DEMOS
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        answer = predict(question="What is the capital of France?", config={"max_tokens": 16}).answer
    assert isinstance(answer, str) and answer.strip()  # parsed from the [[ ## answer ## ]] field


def test_greedy_is_deterministic_and_reports_usage(engine):
    first, second = ask(engine, PROMPTS[0]), ask(engine, PROMPTS[0])
    assert first.text == second.text and first.text.strip()
    assert first.usage.input_tokens > 5 and 0 < first.usage.output_tokens
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens


def test_max_tokens_is_honoured(engine, lm):
    response = ask(engine, "Write a long story about a dragon.", max_tokens=5)
    assert response.usage.output_tokens <= 5 and response.finish_reason == "length"
    lm("Write a long story about a dragon.", max_tokens=3)
    assert 0 < lm.history[-1]["usage"]["completion_tokens"] <= 3


def middle_word(text: str) -> str:
    """A stop string that occurs inside `text`, whatever the model said."""
    words = text.split()
    assert len(words) >= 3, text
    return words[len(words) // 2]


def test_stop_string_cuts_the_output(engine):
    full = ask(engine, "Count from 1 to 10, separated by commas.", max_tokens=12).text
    stop = middle_word(full)
    stopped = ask(engine, "Count from 1 to 10, separated by commas.", max_tokens=12, stop=(stop,))
    assert stopped.text == full[: full.index(stop)] and stopped.finish_reason == "stop"
    assert stopped.usage.output_tokens < 12


def test_concurrent_calls_get_their_own_answers(lm):
    sequential = [lm(p)[0] for p in PROMPTS]
    assert len(set(sequential)) == len(PROMPTS)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda p: lm(p)[0], PROMPTS)) == sequential


def test_evaluate_with_threads(lm):
    """dspy.Evaluate's threads get the answers one caller at a time gets (float32: exactly)."""
    predict = dspy.Predict("question -> answer")
    predict.demos = DEMOS
    questions = ("What is the capital of France?", "Which city is the capital of France?", "Name a colour.")
    with dspy.context(lm=lm.copy(max_tokens=16), adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        alone = {q: predict(question=q).answer for q in questions}
        devset = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in alone.items()]
        result = dspy.Evaluate(
            devset=devset,
            metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
            num_threads=4,
            display_progress=False,
        )(predict)
    assert result.score == 100.0


def test_async_path(lm):
    expected = lm(PROMPTS[1])[0]

    async def both():
        return await asyncio.gather(lm.acall(PROMPTS[1]), lm.acall(PROMPTS[2]))

    first, second = asyncio.run(both())
    assert first == [expected] and second == [lm(PROMPTS[2])[0]]


def _random_loras(folder, seeds):
    """PEFT LoRA adapters with random non-zero A and B matrices: each one changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(EMBEDDED_MODEL), local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
    for seed in seeds:
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.05)
        model.save_pretrained(folder / str(seed))
        yield folder / str(seed)


def test_adapters_are_chosen_by_model_id(lm, engine, tmp_path):
    before = lm(PROMPTS[0])[0]
    dir_one, dir_two = _random_loras(tmp_path, seeds=(1, 2))
    engine.add_adapter("t-one", dir_one)
    engine.add_adapter("t-two", dir_two)
    one, two = lm.copy(model=adapter_model_id(lm.model, "t-one")), lm.copy(model="local/smollm2@t-two")
    out_one, out_two = one(PROMPTS[0])[0], two(PROMPTS[0])[0]
    assert before != out_one and before != out_two and out_one != out_two
    assert lm(PROMPTS[0])[0] == before  # base weights untouched by the adapters
    assert one(PROMPTS[0])[0] == out_one  # switching back and forth is stable
    assert engine.adapters["t-one"] == str(dir_one.resolve())
    with pytest.raises(Exception, match="no adapter 'nope'"):
        lm.copy(model="local/smollm2@nope")("hi")
    with pytest.raises(InputError, match="not a PEFT adapter"):
        engine.add_adapter("empty", tmp_path)


def test_program_save_records_the_engine_without_secrets(lm, tmp_path):
    predict = dspy.Predict("question -> answer")
    predict.set_lm(lm)
    assert copy.deepcopy(predict).lm.engine is lm.engine  # DSPy deep-copies programs: weights stay shared
    predict.save(tmp_path / "p.json")
    state = json.loads((tmp_path / "p.json").read_text())["lm"]
    assert state["engine"]["class"] == "jointcli.inference.engine:LocalEngine"
    assert state["engine"]["state"]["checkpoint"] == EMBEDDED_MODEL
    loaded = dspy.Predict("question -> answer")
    loaded.load(tmp_path / "p.json", allow_unsafe_lm_state=True)
    assert loaded.lm.engine is lm.engine and loaded.lm.model == lm.model


def test_litellm_key_comes_from_the_environment(monkeypatch):
    spec = LiteLLMModel(type="litellm", model="openai/gpt-4o-mini", api_key_env="JOINTOPT_TEST_KEY")
    monkeypatch.delenv("JOINTOPT_TEST_KEY", raising=False)
    with pytest.raises(InputError, match="JOINTOPT_TEST_KEY"):
        build_lm("remote", spec)
    monkeypatch.setenv("JOINTOPT_TEST_KEY", "sk-secret-123")
    lm = build_lm("remote", spec)
    assert lm.kwargs["api_key"] == "sk-secret-123" and "sk-secret" not in json.dumps(lm.dump_state())


def test_resolve_checkpoint_errors(tmp_path):
    assert (resolve_checkpoint(EMBEDDED_MODEL) / "config.json").is_file()
    with pytest.raises(InputError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(InputError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="unknown built-in model"):
        resolve_checkpoint("builtin:gpt-5")


# ---------------------------------------------------------------- batching and prefix reuse (float32)
SYSTEM = (
    "You are a precise assistant. Answer every question briefly, in one short sentence, "
    "and never add commentary, greetings or follow-up questions."
)  # ~30 tokens shared by every prompt


def request(text, model="local/smollm2", system=SYSTEM, **config):
    return Request(
        model=model, system=system, messages=(Message.user(text),), config=Config(**{"max_tokens": 10, **config})
    )


@contextmanager
def settings(engine, **values):
    """Change the knobs of the engine's batch decoder for one test; a long batch window makes
    'arrive together' certain."""
    decoder = engine.decoder
    old = {k: getattr(decoder, k) for k in values}
    for k, v in values.items():
        setattr(decoder, k, v)
    try:
        yield engine
    finally:
        for k, v in old.items():
            setattr(decoder, k, v)


def alone(engine, requests):
    """The reference: one request at a time, nothing shared or cached."""
    with settings(engine, max_batch=1, prefix_reuse=False):
        return [engine.complete(r) for r in requests]


def together(engine, requests):
    """All requests queued at once from this thread: the worker takes them as one batch."""
    futures = [engine._submit_request(r) for r in requests]
    return [f.result() for f in futures]


def same(a, b):
    return [(r.text, r.finish_reason, r.usage.output_tokens) for r in a] == [
        (r.text, r.finish_reason, r.usage.output_tokens) for r in b
    ]


def test_batched_equals_unbatched(engine):
    requests = [request(p) for p in PROMPTS]
    reference = alone(engine, requests)
    assert len({r.text for r in reference}) == len(PROMPTS)
    with settings(engine, batch_window_s=0.3, prefix_reuse=False):
        before = engine.decoder.stats["batches"]
        batched = together(engine, requests)
        assert engine.decoder.stats["batches"] == before + 1  # one batch of four rows
    assert same(batched, reference)
    assert [r.usage.input_tokens for r in batched] == [r.usage.input_tokens for r in reference]


def test_prefix_reuse_equals_no_reuse(engine):
    requests = [request(p, system=SYSTEM + " Be kind.") for p in PROMPTS]
    reference = alone(engine, requests)
    with settings(engine, batch_window_s=0.3):
        before = dict(engine.decoder.stats)
        assert same(together(engine, requests), reference)  # shared prefix computed once for the batch
        assert (
            engine.decoder.stats["prefill_tokens"] - before.get("prefill_tokens", 0)
            < sum(r.usage.input_tokens for r in reference) - 3 * 30
        )
        lone = [engine.complete(r) for r in requests]  # later lone calls take it from the LRU
        assert engine.decoder.stats["lru_tokens"] >= before.get("lru_tokens", 0) + 4 * 30
    assert same(lone, reference)


def test_concurrent_threads_get_their_own_answers(engine):
    requests = [request(p) for p in PROMPTS * 2]
    reference = alone(engine, requests[:4]) * 2
    barrier = threading.Barrier(len(requests))

    def call(r):
        barrier.wait()
        return engine.complete(r)

    with settings(engine, batch_window_s=0.05), ThreadPoolExecutor(len(requests)) as pool:
        assert same(list(pool.map(call, requests)), reference)


def test_each_row_stops_at_its_own_end(engine):
    count = "Count from 1 to 10, separated by commas."
    stop = middle_word(alone(engine, [request(count, system=None, max_tokens=16)])[0].text)
    configs = [dict(max_tokens=16), dict(max_tokens=16, stop=(stop,)), dict(max_tokens=3)]
    requests = [request(count, system=None, **c) for c in configs] + [
        request("Write a long story about a dragon.", system=None, max_tokens=14),
        request(PROMPTS[0], system=None, max_tokens=16),
    ]
    reference = alone(engine, requests)
    with settings(engine, batch_window_s=0.3):
        batched = together(engine, requests)
    assert same(batched, reference)
    full, stopped, short, story, paris = batched
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.usage.output_tokens < full.usage.output_tokens
    assert short.finish_reason == "length" and short.usage.output_tokens == 3
    assert story.finish_reason == "length" and story.usage.output_tokens == 14
    assert paris.finish_reason == "stop" and paris.usage.output_tokens < 16  # its eos, not the longest row's


def test_prefix_cache_never_outlives_its_adapter(engine, tmp_path):
    system = SYSTEM + " This line makes the prefix unique to this test."
    dir_a, dir_b = _random_loras(tmp_path, seeds=(3, 4))
    engine.add_adapter("swap", dir_a)
    swap = "local/smollm2@swap"
    engine.decoder.prefixes.clear()  # the LRU: from here on it holds only what this test puts there
    with settings(engine, batch_window_s=0.3):
        out_a = together(engine, [request(p, model=swap, system=system) for p in PROMPTS[:2]])
        cached = engine.decoder.stats["lru_tokens"]
        base = engine.complete(request(PROMPTS[0], system=system))  # other weights: not from swap's entry
        assert engine.decoder.stats["lru_tokens"] == cached
        engine.add_adapter("swap", dir_b)  # same name, other folder: replaced
        out_b = together(engine, [request(p, model=swap, system=system) for p in PROMPTS[:2]])
        assert engine.decoder.stats["lru_tokens"] == cached
    engine.add_adapter("ref-b", dir_b)
    reference = alone(engine, [request(p, model="local/smollm2@ref-b", system=system) for p in PROMPTS[:2]])
    assert same(out_b, reference) and not same(out_a, out_b)
    assert base.text not in (out_a[0].text, out_b[0].text)


SAMPLING = {"temperature": 0.9, "top_p": 0.95, "top_k": 40}


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_decoding_matches_transformers_generate(engine, sampled):
    """The engine's own decode loop against model.generate, fp32, token for token: the key/value cache
    must really be used (transformers renamed forward's keyword for it; a wrong name is ignored). A
    sampled request with seed s draws what generate draws after torch.manual_seed(s): the same
    temperature, top-k and top-p warpers and the same generator algorithm."""
    import torch

    for seed, text in enumerate(PROMPTS[:2]):
        config = {"max_tokens": 12, **(SAMPLING if sampled else {})}
        ours = ask(engine, text, seed=seed, **config)
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        base_weights, _ = engine._weights("local/smollm2")  # earlier tests added adapters: base only
        torch.manual_seed(seed)
        with torch.inference_mode(), base_weights:
            out = (engine._peft or engine.model).generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=sampled,
                **(SAMPLING if sampled else {}),
                pad_token_id=engine.tokenizer.pad_token_id,
            )
        theirs = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert ours.message.text == theirs


def test_sampled_rows_batch_with_greedy_rows_and_draw_what_they_draw_alone(engine):
    """Sampled requests (temperature > 0) join a batch with greedy ones; each row draws from a
    generator of its own, so a seeded row gives the same answer in the batch as alone, and rows of one
    prompt with other seeds give other answers."""
    sampled = [request("Write a short poem about the sea.", seed=s, max_tokens=16, **SAMPLING) for s in range(4)]
    requests = [request(PROMPTS[0]), *sampled, request(PROMPTS[1])]
    reference = alone(engine, requests)
    with settings(engine, batch_window_s=0.3):
        before = dict(engine.decoder.stats)
        batched = together(engine, requests)
        assert engine.decoder.stats["batches"] == before["batches"] + 1
        assert engine.decoder.stats["sampled"] == before.get("sampled", 0) + 4
    assert same(batched, reference)
    assert len({r.text for r in batched[1:5]}) > 1


# ---------------------------------------------------------------- the recipe's limits
def decoder_limits(engine) -> tuple[int, int, int]:
    decoder = engine.decoder
    return decoder.max_batch, decoder.prefill_tokens, decoder.prefixes.max_tokens


def test_limits_reach_the_shared_engine(lm, engine):
    """models.<name>.limits set the one engine of a checkpoint (no second copy of the weights) and
    leave the model's identity alone; rows over max_batch or prefill_tokens wait for the next batch,
    with the same answers."""
    assert engine.limits == EngineLimits() and decoder_limits(engine) == (16, 8192, 8192)
    requests = [request(p) for p in PROMPTS]
    reference = alone(engine, requests)
    try:
        tight = build_lm("tight", LocalModel(dtype="float32", limits={"max_batch": 2, "prefix_cache_tokens": 0}))
        assert tight.engine is engine and tight.kwargs["metadata"] == lm.kwargs["metadata"]
        assert decoder_limits(engine) == (2, 8192, 0)
        with settings(engine, batch_window_s=0.3, prefix_reuse=False):
            before = engine.decoder.stats["batches"]
            assert same(together(engine, requests), reference)
            assert engine.decoder.stats["batches"] - before == 2  # two batches of two rows
            build_lm("tight", LocalModel(dtype="float32", limits={"prefill_tokens": 64}))
            before = engine.decoder.stats["batches"]
            assert same(together(engine, requests), reference)
            assert engine.decoder.stats["batches"] - before == 4  # every prompt is over 64 / 2 tokens: alone
    finally:
        build_lm("smollm2", LocalModel(dtype="float32"), cache=False)  # the defaults again
    assert engine.limits == EngineLimits() and decoder_limits(engine) == (16, 8192, 8192)


def test_models_on_one_engine_must_agree_on_limits():
    recipe = load_recipe(
        RECIPES / "sst2.yaml",
        ["models.twin.type=local", "models.twin.max_tokens=8", "models.twin.limits.max_batch=4"],
    )
    with pytest.raises(InputError, match="models.small and models.twin run on one engine"):
        ModelPool(recipe)


def test_out_of_memory_names_the_limits(engine, monkeypatch):
    """A batch that runs out of memory fails its callers with one line naming the limits to lower;
    under DSPy (which wraps it) it still ends the step; the engine serves on."""
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with settings(engine, prefix_reuse=False):
        monkeypatch.setattr(engine.decoder, "_forward", out_of_memory)
        with pytest.raises(StepError) as caught:
            engine.complete(request(PROMPTS[0]))
        message = str(caught.value)
        assert "\n" not in message and "local/smollm2 ran out of cpu memory on 1 request at once" in message
        assert "models.smollm2.limits.max_batch (16), .prefill_tokens (8192) or .prefix_cache_tokens (8192)" in message
        lm = build_lm("smollm2", LocalModel(dtype="float32"), cache=False)
        with pytest.raises(Exception) as wrapped:
            lm(PROMPTS[0])
        assert server_failure(wrapped.value) is not None and "ran out of" in str(server_failure(wrapped.value))
        monkeypatch.undo()
    assert engine.complete(request(PROMPTS[0])).text
