"""How the batch decoder may pad a batch for a model's attention pattern.

The decoder left-pads each row's suffix, so pads sit between the shared prefix and the suffix.
With causal attention over every earlier token a 2-D padding mask is enough (transformers builds
the causal mask from it). transformers measures a sliding window in cache slots, which those pads
shift: hybrid full/sliding-window models (Gemma 2/3) get per-layer-type masks built from the real
positions instead (SlidingLayout), and any other window pattern batches only rows of one prompt
length (UNPADDED).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNPADDED = "unpadded"  # attention_layout: batch only rows of one prompt length (no padding at all)


@dataclass(frozen=True)
class SlidingLayout:
    """A hybrid model whose layers attend fully or within a sliding window (Gemma 2/3, Qwen2 with
    use_sliding_window): transformers measures the window in cache slots, which the pads between the
    shared prefix and a row's suffix would shift, so the decoder gives each layer type a 4-D mask
    built from the tokens' real positions instead (the models take a {layer type: mask} mapping)."""

    window: int
    layer_types: tuple[str, ...]

    def masks(self, padding, keys, queries, dtype) -> dict:
        """{layer type: additive mask [rows, 1, queries, keys]}. padding: [rows, keys] 1 for real tokens;
        keys, queries: their positions; the queries are the last slots of the cache."""
        distance = queries[:, :, None] - keys[:, None, :]  # [rows, queries, keys]
        allowed = padding.bool()[:, None, :] & (distance >= 0)
        own = torch.zeros(distance.shape[1:], dtype=torch.bool, device=distance.device)
        q = own.shape[0]
        own[torch.arange(q), own.shape[1] - q + torch.arange(q)] = True  # a pad query sees itself: no empty row
        out = {}
        for kind in self.layer_types:
            ok = allowed & (distance < self.window) if kind == "sliding_attention" else allowed
            out[kind] = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(
                ~(ok | own), torch.finfo(dtype).min
            )[:, None]
        return out


def attention_layout(config):
    """How the decoder may pad a batch for this model: None (causal attention over every earlier
    token: a 2-D padding mask is enough), a SlidingLayout (full and sliding-window layers: masks of
    its own), or UNPADDED (any other attention pattern, e.g. a sliding window on every layer without
    layer types, or chunked attention: rows are batched only with rows of the same prompt length, where
    a cache slot is a position and transformers' own masks are right).

    >>> from types import SimpleNamespace as Config
    >>> attention_layout(Config(sliding_window=None, layer_types=["full_attention"])) is None
    True
    >>> attention_layout(Config(sliding_window=512, layer_types=["sliding_attention", "full_attention"]))
    SlidingLayout(window=512, layer_types=('sliding_attention', 'full_attention'))
    >>> attention_layout(Config(sliding_window=4096, layer_types=None))
    'unpadded'
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = tuple(dict.fromkeys(getattr(text, "layer_types", None) or ()))
    if not types:
        return UNPADDED if window else None
    if set(types) <= {"full_attention"}:
        return None
    if window and set(types) <= {"full_attention", "sliding_attention"}:
        return SlidingLayout(int(window), types)
    return UNPADDED
