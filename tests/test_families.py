"""Any Hugging Face checkpoint folder, not only the embedded model: the engine (batched greedy decoding,
prefix reuse, adapters), LoRA training (shared-prefix micro-batches) and adapter loading on tiny
random-weight checkpoints of the common decoder families, built here once per session (no hub, no
download): Llama (Llama-3 chat headers), SmolLM (Llama with plain-string turns), Qwen2 and Qwen3
(ChatML, q/k norms for Qwen3), Gemma 2 and Gemma 3 text (hybrid sliding-window/full attention with a
window shorter than the prompts, soft-capping for Gemma 2).

    .venv/bin/python -m pytest tests/test_families.py -q

Each checkpoint reuses the embedded model's tokenizer with a chat template of its own family's shape
(and the special tokens it needs), so the tests show that the engine and the trainer use the
checkpoint's template. Everything runs in float32, where batching and prefix reuse change only
rounding: answers are compared token for token, with each other and with transformers' and PEFT's
own greedy generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dspy.lm15 import Config, Message, Request

from jointcli.errors import InputError
from jointcli.models import build_lm
from jointcli.recipe import EMBEDDED_MODEL, LocalModel, Lora, Train
from jointcli.weights.checkpoint import check_model_path, resolve_checkpoint

from . import test_lora as lora_tests

pytestmark = pytest.mark.model  # and importing this file imports no torch/transformers (the fast tier)

SLIDING_WINDOW = 16  # Gemma's sliding layers: shorter than every prompt below, so the window matters

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
PLAIN = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
QWEN2 = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3 = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)
# Gemma 2's refuses a system message (the engine then folds it into the first user turn); Gemma 3's
# puts it there itself
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ prefix if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    initializer_range=0.1,
)
# family -> (config class, its settings, chat template, special tokens added, end-of-turn token, marker
# that only this family's prompts contain, pad token kept)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        {},
        LLAMA3,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>",
        False,
    ),
    "smollm": (
        "LlamaConfig",
        {"tie_word_embeddings": True, "num_key_value_heads": 1},
        PLAIN,
        [],
        None,
        "### User:\n",
        True,
    ),
    "qwen2": (
        "Qwen2Config",
        {"tie_word_embeddings": True},
        QWEN2,
        [],
        "<|im_end|>",
        "<|im_start|>system\nYou are a helpful assistant.",
        True,
    ),
    "qwen3": ("Qwen3Config", {}, QWEN3, ["<think>", "</think>"], "<|im_end|>", "<think>\n\n</think>", False),
    "gemma2": (
        "Gemma2Config",
        {"sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
        GEMMA2,
        ["<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        "<start_of_turn>model\n",
        True,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {"sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
        GEMMA3,
        ["<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        "<start_of_turn>model\n",
        False,
    ),
}
NAMES = list(FAMILIES)


def build_checkpoint(family: str, folder: Path) -> Path:
    """A random-weight checkpoint of `family` (2 layers, hidden 64, GQA where the family has it) with
    the embedded model's tokenizer and the family's chat template, saved as a Hugging Face folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, settings, template, tokens, end, _, keep_pad = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(EMBEDDED_MODEL), local_files_only=True)
    if tokens:
        tokenizer.add_tokens(tokens, special_tokens=True)
    tokenizer.chat_template = template
    if not keep_pad:
        tokenizer.pad_token = None
    eos = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids(end)] if end else [])
    config = getattr(transformers, config_class)(
        **{**SIZES, **settings},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    # random weights: a seed whose greedy answers have no near-tie between two tokens, which float
    # rounding (batched or not, AVX2 or AVX-512 kernels) could break either way
    torch.manual_seed(sum(map(ord, family)) + 1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(params=NAMES)
def family(request, family_checkpoints) -> tuple[str, Path]:
    return request.param, family_checkpoints[request.param]


def get_engine(*args):
    from jointcli.inference import engine  # here: importing this file must not import transformers

    return engine.get_engine(*args)


def engine_of(folder: Path):
    return get_engine(str(folder), "float32", "cpu")


SYSTEM = (
    "You are a precise assistant. Answer every question briefly, in one short sentence, and never "
    "add commentary, greetings or follow-up questions."
)
PROMPTS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello in French, please."]


def request(text: str, model: str = "local/tiny", system: str | None = SYSTEM, max_tokens: int = 12) -> Request:
    return Request(model=model, system=system, messages=(Message.user(text),), config=Config(max_tokens=max_tokens))


def messages_of(req: Request, folded: bool = False) -> list[dict]:
    """The request's chat messages; `folded`: the system message at the top of the first user message
    (what the engine sends to a template that refuses a system message, Gemma 2's)."""
    user = [{"role": "user", "content": m.text} for m in req.messages]
    if not req.system:
        return user
    if folded:
        return [{"role": "user", "content": req.system + "\n\n" + user[0]["content"]}, *user[1:]]
    return [{"role": "system", "content": req.system}, *user]


def token_ids(engine, requests: list[Request], batch: bool, prefix_reuse: bool) -> list[list[int]]:
    """The generated token ids of each request: queued at once (one batch) or one at a time."""
    from jointcli.inference.batch_decoder import Job

    decoder = engine.decoder
    old = decoder.max_batch, decoder.batch_window_s, decoder.prefix_reuse
    decoder.max_batch, decoder.batch_window_s, decoder.prefix_reuse = (16 if batch else 1), 0.05, prefix_reuse
    try:
        if not prefix_reuse:
            decoder.prefixes.clear()
        jobs = [Job(r, engine._prompt_ids(r), r.config.max_tokens, ()) for r in requests]
        if batch:
            futures = [decoder.submit(j) for j in jobs]
            for f in futures:
                f.result()
        else:
            for j in jobs:
                decoder.submit(j).result()
        return [list(j.new) for j in jobs]
    finally:
        decoder.max_batch, decoder.batch_window_s, decoder.prefix_reuse = old


def generate_ids(model, engine, req: Request) -> list[int]:
    """transformers' own greedy generate on the checkpoint's chat template, stopping at the engine's eos ids."""
    import torch

    folded = "System role not supported" in engine.tokenizer.chat_template
    ids = engine.tokenizer.apply_chat_template(
        messages_of(req, folded), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    eos = sorted(engine.decoder.eos_ids)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=req.config.max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    return out[0, ids.shape[1] :].tolist()


# ---------------------------------------------------------------- the folder, the template, a DSPy call
def test_folder_is_accepted_and_the_prompt_is_its_chat_template(family):
    name, folder = family
    check_model_path(str(folder))
    engine = engine_of(folder)
    assert type(engine.model).__name__.lower().startswith(FAMILIES[name][0][:5].lower())
    for req in (request(PROMPTS[0]), request(PROMPTS[1], system=None)):
        expected = engine.tokenizer.apply_chat_template(
            messages_of(req, folded=name == "gemma2"), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert engine._prompt_ids(req) == list(expected)
    text = engine.tokenizer.decode(engine._prompt_ids(request(PROMPTS[1], system=None)))
    marker = FAMILIES[name][5]
    assert marker in text and all(FAMILIES[other][5] not in text for other in FAMILIES if FAMILIES[other][5] != marker)
    if name.startswith("gemma"):  # the system message opens the first user turn, refused or not
        text = engine.tokenizer.decode(engine._prompt_ids(request(PROMPTS[1])))
        assert f"<start_of_turn>user\n{SYSTEM}\n\n{PROMPTS[1]}<end_of_turn>" in text


def test_engine_answers_a_dspy_call(family):
    name, folder = family
    lm = build_lm(name, LocalModel(path=str(folder), dtype="float32", device="cpu", max_tokens=8), cache=False)
    first = lm("What is the capital of France?")
    assert isinstance(first, list) and len(first) == 1 and isinstance(first[0], str)
    assert lm("What is the capital of France?") == first  # greedy
    assert 0 < lm.history[-1]["usage"]["completion_tokens"] <= 8


# ---------------------------------------------------------------- batching and prefix reuse (float32)
def test_batched_and_prefix_reuse_equal_one_by_one_and_generate(family):
    name, folder = family
    engine = engine_of(folder)
    requests = [request(p) for p in PROMPTS] + [request(PROMPTS[0], system=None, max_tokens=5)]
    lengths = {len(engine._prompt_ids(r)) for r in requests}
    assert len(lengths) > 2 and max(lengths) > 2 * SLIDING_WINDOW  # padding in the batch; past the window
    alone = token_ids(engine, requests, batch=False, prefix_reuse=False)
    assert all(alone) and len({tuple(ids) for ids in alone}) > 1
    before = dict(engine.decoder.stats)
    assert token_ids(engine, requests, batch=True, prefix_reuse=False) == alone
    assert engine.decoder.stats["batches"] - before.get("batches", 0) == 1  # one batch of 5 rows
    shared = token_ids(engine, requests, batch=True, prefix_reuse=True)  # the system message computed once
    assert shared == alone
    assert token_ids(engine, requests, batch=False, prefix_reuse=True) == alone  # ... and from the LRU
    assert engine.decoder.stats["lru_tokens"] > before.get("lru_tokens", 0)
    base_weights, _ = engine._weights("local/tiny")
    with base_weights:
        assert [generate_ids(engine._peft or engine.model, engine, r) for r in requests] == alone


def test_other_attention_patterns_batch_only_rows_of_one_length(family_checkpoints):
    """A model whose attention the decoder cannot mask itself (a sliding window on every layer, chunked
    attention) is batched without padding: still the one-by-one answers. Here Gemma 2 forced onto that path."""
    from jointcli.inference.attention import UNPADDED, SlidingLayout, attention_layout

    engine = engine_of(family_checkpoints["gemma2"])
    assert isinstance(attention_layout(engine.model.config), SlidingLayout)
    requests = [request(p) for p in PROMPTS] + [request(PROMPTS[0])]  # two rows of one length
    alone = token_ids(engine, requests, batch=False, prefix_reuse=False)
    layout, engine.decoder._layout = engine.decoder._layout, UNPADDED
    try:
        before = engine.decoder.stats["batches"]
        assert token_ids(engine, requests, batch=True, prefix_reuse=True) == alone
        lengths = {len(engine._prompt_ids(r)) for r in requests}
        assert engine.decoder.stats["batches"] - before == len(lengths) < len(requests)
    finally:
        engine.decoder._layout = layout


def test_attention_layouts_of_other_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from jointcli.inference.attention import UNPADDED, SlidingLayout, attention_layout

    assert attention_layout(LlamaConfig()) is None and attention_layout(Qwen2Config()) is None
    qwen = Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1, num_hidden_layers=2)
    assert attention_layout(qwen) == SlidingLayout(64, ("full_attention", "sliding_attention"))
    assert attention_layout(MistralConfig(sliding_window=64)) is UNPADDED
    assert attention_layout(MistralConfig(sliding_window=None)) is None


# ---------------------------------------------------------------- LoRA training and adapters
def rows() -> list[dict]:
    return lora_tests.sentiment_rows()[:4]


@pytest.fixture(scope="session")
def trained(family_checkpoints, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each family's adapter after 2 optimizer steps (2 rows each, sharing their prompt prefix)."""
    from jointcli.training.lora import train_lora

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, folder in family_checkpoints.items():
        result = train_lora(
            folder,
            rows(),
            root / name,
            Lora(r=4, alpha=16),
            Train(epochs=1, batch_size=2, learning_rate=5e-2),
            seed=0,
            log_path=root / f"{name}.log.jsonl",
            device="cpu",
            dtype="float32",
        )
        out[name] = (root / name, result)
    return out


def test_train_lora_writes_a_peft_adapter_the_engine_serves_as_peft_does(family, trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, folder = family
    adapter, result = trained[name]
    assert result.steps == 2 and result.rows == 4 and result.final_loss is not None
    log = [json.loads(line) for line in (adapter.parent / f"{name}.log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every target module was trained

    engine = engine_of(folder)
    engine.add_adapter(f"{name}-tuned", adapter)
    model_id = f"local/tiny@{name}-tuned"
    requests = [request(p, model=model_id) for p in PROMPTS[:3]]
    ours = token_ids(engine, requests, batch=True, prefix_reuse=True)
    assert [generate_ids(tuned, engine, r) for r in requests] == ours
    assert ours != token_ids(engine, [request(p) for p in PROMPTS[:3]], batch=True, prefix_reuse=True)


def test_shared_prefix_training_gives_the_loss_and_gradient_of_whole_rows(family):
    """tests/test_lora.py's equality checks, on this family's checkpoint: the completion-head loss is
    the model's own loss (Gemma 2's soft-capped logits included), and the shared prefix gives the loss
    and LoRA gradients of whole rows (Gemma's window is shorter than the shared prefix)."""
    from transformers import AutoTokenizer

    from jointcli.training.rows import to_prompt_completion, tokenize_pair

    _, folder = family
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = (tokenizer, [tokenize_pair(tokenizer, p) for p in to_prompt_completion(lora_tests.sentiment_rows())])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id  # collate() needs an id; the padding is masked out
    trainable = lora_tests.model_with_gradients(folder)
    lora_tests.test_completion_head_loss_equals_the_models_loss(trainable, encoded)
    for same_length in (False, True):
        lora_tests.test_shared_prefix_gives_the_loss_and_gradient_of_whole_rows(folder, trainable, same_length)


# ---------------------------------------------------------------- what is refused
def test_a_checkpoint_without_a_chat_template_is_refused_in_one_line(family_checkpoints, tmp_path):
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(family_checkpoints["llama"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="no chat template") as err:
        get_engine(str(folder), "float32", "cpu")
    assert "\n" not in str(err.value)


def test_a_template_that_refuses_the_messages_is_one_input_error(family_checkpoints):
    from transformers import AutoTokenizer

    from jointcli.weights.chat import chat_ids

    tokenizer = AutoTokenizer.from_pretrained(family_checkpoints["gemma2"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
    assert chat_ids(tokenizer, messages, add_generation_prompt=True) == chat_ids(
        tokenizer, [{"role": "user", "content": "Be brief.\n\nHi."}], add_generation_prompt=True
    )
    tokenizer.chat_template = "{{ raise_exception('No chat here') }}"
    with pytest.raises(InputError, match="refused the messages: No chat here") as err:
        chat_ids(tokenizer, messages, add_generation_prompt=True)
    assert "\n" not in str(err.value)


def test_folders_that_are_not_causal_lm_checkpoints_are_refused_in_one_line(family_checkpoints, tmp_path):
    import shutil

    encoder = tmp_path / "t5"
    shutil.copytree(family_checkpoints["llama"], encoder)  # a tokenizer with a chat template, other weights
    (encoder / "model.safetensors").unlink()
    (encoder / "config.json").write_text(
        json.dumps(
            {"model_type": "t5", "d_model": 8, "num_layers": 1, "num_heads": 1, "d_kv": 8, "d_ff": 8, "vocab_size": 10}
        )
    )
    check_model_path(str(encoder))  # validate reads config.json only; the load says what is wrong
    with pytest.raises(InputError, match="cannot load it as a causal LM") as err:
        get_engine(str(encoder), "float32", "cpu")
    assert "\n" not in str(err.value)
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / "config.json").write_text("{}")
    with pytest.raises(InputError, match="names no model_type"):
        check_model_path(str(nameless))
