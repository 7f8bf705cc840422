"""What differs between the transformers versions jointopt runs on (5.0 to 5.2x and later)."""

from __future__ import annotations

import inspect


def cache_keyword(module) -> str:
    """The forward keyword of `module` that takes a key/value cache: transformers renamed
    `past_key_values` to `cache` (5.2x), and an unknown keyword is swallowed by **kwargs (decoding or
    training without the cache is silently wrong, found on a GPU machine's 5.17), so ask the signature."""
    params = inspect.signature(type(module).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise RuntimeError(f"{type(module).__name__}.forward takes no key/value cache (cache or past_key_values)")
