"""Text embeddings from a local model, offline: the mean of its last hidden states, for DSPy's KNN.

    embedder = local_embedder(pool.get("small"))        # a dspy.Embedder on the model's engine
    vectors = embedder(["a charming film", "a dull one"])  # np.ndarray, (2, hidden size), rows of length 1

KNNFewShot (steps/knn.py) finds the training examples nearest an input by the dot product of such
vectors. They come from the recipe's own local model, on the engine that already holds its weights,
so they need no download, no other package and no second copy of a model: the embedded SmolLM2-135M
gives 576 numbers a text. The base weights embed (never a module's LoRA adapter), so a later weight
step leaves every neighbour as it was. A text is the model's plain tokens (no chat template); its
vector is the mean of the last layer's hidden states over those tokens, scaled to length 1. Each
text runs alone, so its vector does not depend on what it was embedded with (the same in every
process), padded on the right to a multiple of 32 tokens, which its tokens never attend to (the
attention is causal): a CPU backend prepares its kernels once per shape, in seconds, and a handful
of shapes serves every text. It runs on the engine's worker between generation batches and is
remembered for the process's lifetime.
"""

from __future__ import annotations

import threading

import dspy
import numpy as np

from ..errors import InputError

MAX_TOKENS = 512  # a longer text is embedded by its first 512 tokens
PAD_TO = 32  # lengths are padded to a multiple of this: at most 16 shapes
_TOKENIZERS: dict[str, object] = {}  # checkpoint -> the embedder's own tokenizer (the engine's callers share theirs)
_VECTORS: dict[tuple[str, str], np.ndarray] = {}  # (the engine's weights_id, text) -> its vector
_LOCK = threading.Lock()


def local_embedder(lm: dspy.LM) -> dspy.Embedder:
    """A dspy.Embedder (a list of strings -> np.ndarray) on the engine of a local model's LM."""
    engine = getattr(lm, "engine", None)
    if not hasattr(engine, "decoder"):
        raise InputError(f"{lm.model}: KNNFewShot embeds with a local model's hidden states; this is not a local model")
    # the vectors are remembered here (_VECTORS): DSPy's own embedding cache is for hosted models
    return dspy.Embedder(lambda texts: embed(engine, texts), caching=False)


def embed(engine, texts: list[str]) -> np.ndarray:
    """(len(texts), hidden size) float32 unit vectors of `texts`."""
    rows = [_vector(engine, text) for text in texts]
    return np.stack(rows) if rows else np.zeros((0, engine.model.config.hidden_size), np.float32)


def _vector(engine, text: str) -> np.ndarray:
    key = (engine.weights_id, text)
    if key not in _VECTORS:
        ids = _tokenizer(engine)(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        vector = engine.decoder.call(_forward, engine, ids or [engine.tokenizer.eos_token_id]).result()
        with _LOCK:
            _VECTORS[key] = vector
    return _VECTORS[key]


def _tokenizer(engine):
    from ..weights.checkpoint import load_tokenizer  # transformers: only once a local model embeds

    with _LOCK:
        key = str(engine.checkpoint)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = load_tokenizer(engine.checkpoint)
        return _TOKENIZERS[key]


def _forward(engine, ids: list[int]) -> np.ndarray:
    """On the engine's worker: the base weights' last hidden states of one text, averaged, length 1."""
    import torch  # loaded with the engine already

    weights, _ = engine.decoder.select_weights("embed")  # an id without '@': the base weights
    body = engine.decoder.model.base_model  # the transformer without its LM head: no logits to compute
    width = -(-len(ids) // PAD_TO) * PAD_TO
    tokens = torch.tensor([ids + [ids[-1]] * (width - len(ids))], device=engine.device)
    with torch.inference_mode(), weights:
        hidden = body(input_ids=tokens).last_hidden_state[0, : len(ids)]
    return torch.nn.functional.normalize(hidden.float().mean(0), dim=-1).cpu().numpy()
