"""The shared prompt prefix of a batch, computed once, and an LRU of recent prefixes keyed by the exact weights.

DSPy prompts of one module start with the same system message and demos. The longest common token
prefix of a batch is computed once (batch 1) and its key/value cache is repeated for every row (see
cache_with); only each row's own suffix is then fed by the batch decoder. Prefixes of MIN_PREFIX+
tokens are also kept in a small LRU (at most `max_tokens` tokens, the recipe's
models.<name>.limits.prefix_cache_tokens, in at most PREFIX_CACHE_ENTRIES entries), keyed by the
weights (an opaque tuple from the engine: base, or adapter name + folder + load count) and the
prefix's token ids, so later batches and lone calls skip them too. An entry is reused only for the
exact same weights: replacing an adapter drops its entries (drop), and its new load count would
never match them anyway.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict

import torch
from transformers import DynamicCache

MIN_PREFIX = 16  # shorter shared prefixes are not worth an LRU entry
PREFIX_CACHE_ENTRIES = 8  # the token budget bounds the memory; this, the time spent finding an entry


class PrefixCache:
    """Key/value tensors of shared prompt prefixes (per layer: keys, values of batch 1), computed with
    `forward(ids, cache, positions=...)` (one forward pass that extends `cache`) and kept in an LRU.
    Counts the prompt tokens it runs (stats["prefill_tokens"]) and takes from the LRU (stats["lru_tokens"]).
    max_tokens: the LRU's budget in cached tokens (batch 1); the newest entry is kept even over it."""

    def __init__(self, forward, device: str, stats: Counter, max_tokens: int):
        self.forward, self.device, self.stats, self.max_tokens = forward, device, stats, max_tokens
        self.entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def shared_prefix(self, prompts: list[list[int]], weights_key: tuple) -> tuple[int, list | None]:
        """The shared prefix of the prompts and its key/value tensors (batch 1), from the LRU where
        possible. Every row keeps at least one token of its own: its logits give the first new token."""
        target = min(common_len(prompts[0], p) for p in prompts)
        target = min(target, min(len(p) for p in prompts) - 1)
        if target <= 0:
            return 0, None
        ids = prompts[0][:target]
        # the cached entry that shares most tokens with this prefix (any part of an entry is reusable)
        best_key, have = None, 0
        for key in self.entries:
            if key[0] == weights_key:
                n = common_len(key[1], ids)
                if n >= have and n > 0:
                    best_key, have = key, n
        kv = None
        if best_key is not None:
            self.entries.move_to_end(best_key)
            kv = [(k[:, :, :have], v[:, :, :have]) for k, v in self.entries[best_key]]
        self.stats["lru_tokens"] += have  # taken from the LRU instead of computed
        if have < target:  # compute the rest of the prefix once, on top of what was cached
            cache = cache_with(kv, repeat=1)
            self.forward(
                torch.tensor([ids[have:]], device=self.device),
                cache,
                positions=torch.arange(have, target, device=self.device)[None],
            )
            kv = [(k, v) for k, v, *_ in cache]
            self.stats["prefill_tokens"] += target - have
            # worth keeping: a prefix that several rows share, or a lone prompt with nothing cached
            # like it (the next lone prompt of the same module then reuses its shared part)
            if target >= MIN_PREFIX and (len(prompts) > 1 or have < MIN_PREFIX):
                self._remember((weights_key, tuple(ids)), kv)
        return target, kv

    def _remember(self, key: tuple, kv: list) -> None:
        self.entries[key] = kv
        self.entries.move_to_end(key)
        while len(self.entries) > PREFIX_CACHE_ENTRIES or (
            len(self.entries) > 1 and sum(len(k[1]) for k in self.entries) > self.max_tokens
        ):
            self.entries.popitem(last=False)

    def drop(self, weights_head: tuple) -> None:
        """Forget the entries of every weights key that starts with `weights_head` (weights replaced)."""
        for key in [k for k in self.entries if k[0][: len(weights_head)] == weights_head]:
            del self.entries[key]

    def clear(self) -> None:
        self.entries.clear()


def common_len(a, b) -> int:
    """Length of the common prefix of two token sequences.

    >>> common_len([1, 2, 3], (1, 2, 4, 5))
    2
    """
    return len(os.path.commonprefix([list(a), list(b)]))


def cache_with(kv: list | None, repeat: int) -> DynamicCache:
    """A fresh DynamicCache holding `kv` (per layer: keys, values of batch 1) repeated `repeat` times
    along the batch. The cache copies the tensors, so the LRU's entries are never changed by decoding."""
    if kv is None:
        return DynamicCache()
    return DynamicCache([(k.expand(repeat, -1, -1, -1), v.expand(repeat, -1, -1, -1)) for k, v in kv])
