"""The micro-batches of one optimizer step: planning under a token budget, collation, and the loss
of the completion tokens, with a prompt prefix shared by the rows computed once.

- micro-batch planning (`micro_batches`): an optimizer step's rows, sorted by length, are cut into
  micro-batches of at most a token budget of computed tokens, so memory is bounded whatever the
  recipe's batch size, and rows of similar length share a batch (little padding; none when a
  micro-batch has one row or rows of one length, and then no attention mask either). Micro-batches
  give the gradient of the whole step (tested);
- shared prefix (`shared_prefix`, `collate_shared`, `shared_completion_nll`): rows of one module
  start with the same system message and demos (most of a row on sst2). When the rows of a
  micro-batch share MIN_SHARED_PREFIX+ tokens, that prefix goes through the decoder once (batch 1,
  with gradients) and its key/value cache, repeated for every row, serves the rows' own suffixes in
  one batch (the prefix stops before the token that predicts the first completion token). A
  micro-batch then costs prefix + rows x longest suffix tokens instead of rows x longest row, so
  several such rows fit one micro-batch. Same loss and LoRA gradients as whole rows (tested); LoRA
  dropout, if any, draws one mask for the shared part;
- completion-only LM head (`completion_nll`): the decoder body gives hidden states and only the
  label positions (a few dozen of a row's hundreds of tokens) go through the LM head, instead of the
  [batch, seq, vocab] fp32 logits of the whole rows and their gradient. Same loss as the model's own
  (tested).

A row is (token ids of prompt + completion, index of the first completion token), as
`lora.tokenize_pair` gives it; the loss is on the completion tokens only.
"""

from __future__ import annotations

import os

from .soft_prompt import model_inputs

# Rows of a micro-batch whose common token prefix is at least this long compute it once (batch 1) and
# run their own suffixes against its key/value cache; a shorter prefix is not worth a second pass.
MIN_SHARED_PREFIX = 32
SHARE_PREFIX = True  # off: every row runs whole (the plan and the gradient are those of trainer 2)

def _common_len(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


Row = tuple[list[int], int]  # token ids of prompt + completion, index of the first completion token


def micro_batches(lengths: list[int], step: list[int], token_budget: int,
                  rows: list[Row] | None = None) -> list[list[int]]:
    """Split one optimizer step's rows into micro-batches of similar length (sorted, longest first),
    each at most `token_budget` computed tokens (a longer row goes alone). Without `rows` (token ids
    and completion start of every row) a micro-batch costs rows x its longest row (padded tokens);
    with them, a micro-batch whose rows share a prefix (`shared_prefix`) costs the prefix once plus
    rows x the longest suffix, which is what `shared_completion_nll` computes."""
    order = sorted(step, key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    common, first_start = 0, 0  # of the last micro-batch: common prefix of its rows, their first completion
    for i in order:
        if out:
            group = out[-1]
            head = group[0]  # the longest row, first of its micro-batch
            n = len(group) + 1
            if rows is None:
                cost = n * lengths[head]
            else:
                c = min(common, _common_len(rows[head][0], rows[i][0]))
                f = min(first_start, rows[i][1])
                shared = _shared_len(c, f, min(lengths[head], lengths[i]), n)
                cost = shared + n * (lengths[head] - shared)
            if cost <= token_budget:
                group.append(i)
                if rows is not None:
                    common, first_start = c, f
                continue
        out.append([i])
        if rows is not None:
            common, first_start = lengths[i], rows[i][1]
    return out


def _shared_len(common: int, first_start: int, shortest: int, n_rows: int) -> int:
    """Prefix tokens a micro-batch computes once: its rows' common prefix, cut so that the hidden
    state predicting each row's first completion token (at first_start - 1) and at least one token
    of every row stay in the suffix; 0 (no sharing) for one row or a prefix under MIN_SHARED_PREFIX."""
    shared = min(common, first_start - 1, shortest - 1)
    return shared if n_rows > 1 and shared >= MIN_SHARED_PREFIX and SHARE_PREFIX else 0


def shared_prefix(rows: list[Row]) -> int:
    """Tokens at the start of every row that a micro-batch computes once (see _shared_len); 0: none."""
    if len(rows) < 2:
        return 0
    first = rows[0][0]
    common = min(_common_len(first, ids) for ids, _ in rows[1:])
    return _shared_len(common, min(start for _, start in rows), min(len(ids) for ids, _ in rows), len(rows))


def collate(rows: list[Row], pad_id: int, device: str = "cpu"):
    """Right-padded input_ids, attention_mask (None when nothing is padded) and labels (-100 on
    the prompt and the padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), 0 if pad_id is None else pad_id, dtype=torch.long)  # masked out
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, start:len(ids)] = input_ids[r, start:len(ids)]
        mask[r, :len(ids)] = 1
    padded = bool((mask == 0).any())
    return (input_ids.to(device), mask.to(device) if padded else None, labels.to(device))


def completion_nll(model, input_ids, attention_mask, labels, soft=None, per_row: bool = False):
    """Summed cross-entropy of the labeled (completion) tokens, and their count.

    The decoder body gives hidden states; only the positions whose next token has a label go
    through the LM head (~20 of ~500 here), so the [batch, seq, vocab] logits of the full model
    are never built. Same value as the model's own loss x the number of label tokens.
    soft: the soft prompt [n, hidden] that negative ids stand for (soft_prompt.py), if any.
    per_row: each row's summed cross-entropy and label count instead (tensors, one entry a row)."""
    base, body = _base_and_body(model)
    hidden = body(**model_inputs(base, input_ids, soft), attention_mask=attention_mask,
                  use_cache=False).last_hidden_state
    return _label_nll(base, hidden, labels, per_row)


def collate_shared(rows: list[Row], prefix_len: int, pad_id: int, device: str = "cpu"):
    """The rows' shared first `prefix_len` tokens [1, prefix_len], and their own suffixes as `collate`
    gives them (right-padded input_ids, attention_mask over prefix + suffix or None when nothing is
    padded, labels), plus their position ids (continuing after the prefix)."""
    import torch

    prefix = rows[0][0][:prefix_len]
    if not all(ids[:prefix_len] == prefix and start > prefix_len for ids, start in rows):
        raise ValueError(f"rows do not share {prefix_len} prompt tokens before their completions")
    input_ids, mask, labels = collate([(ids[prefix_len:], start - prefix_len) for ids, start in rows], pad_id)
    if mask is not None:
        mask = torch.cat([mask.new_ones((len(rows), prefix_len)), mask], dim=1)
    positions = torch.arange(prefix_len, prefix_len + input_ids.shape[1])[None].expand(len(rows), -1)
    return (torch.tensor([prefix], device=device), input_ids.to(device),
            mask.to(device) if mask is not None else None, labels.to(device), positions.to(device))


def shared_completion_nll(model, prefix_ids, input_ids, attention_mask, labels, position_ids, soft=None,
                          per_row: bool = False):
    """completion_nll of rows that start with the same `prefix_ids` (batch 1), as `collate_shared`
    gives them: the prefix goes through the decoder once, and its key/value cache, repeated for every
    row (autograd sums the rows' gradients into the one prefix computation), serves the rows' own
    suffixes in one batch. Same loss and gradients as completion_nll on the whole rows (tested); every
    label and the hidden state predicting it lie in the suffix."""
    from transformers import DynamicCache

    from .compat import cache_keyword

    base, body = _base_and_body(model)
    cache_kw = cache_keyword(body)
    prefix_len, (n, width) = prefix_ids.shape[1], input_ids.shape
    cache = DynamicCache(config=base.config)
    body(**model_inputs(base, prefix_ids, soft), use_cache=True, **{cache_kw: cache})
    if cache.get_seq_length() != prefix_len:  # the cache keyword was ignored: never train on a wrong loss
        raise RuntimeError(f"the decoder did not fill the prefix cache passed as {cache_kw!r}")
    cache.batch_repeat_interleave(n)
    hidden = body(**model_inputs(base, input_ids, soft), attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=True, **{cache_kw: cache}).last_hidden_state
    if cache.get_seq_length() != prefix_len + width:
        raise RuntimeError(f"the decoder did not use the prefix cache passed as {cache_kw!r}")
    if bool((labels[:, 0] != -100).any()):
        raise ValueError("a label on the first suffix token: its predicting hidden state is in the prefix")
    return _label_nll(base, hidden, labels, per_row)


def _base_and_body(model):
    """(the causal LM under a PEFT wrapper, if any; its decoder body, without the LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    return base, body


def _label_nll(base, hidden, labels, per_row: bool = False):
    """Summed cross-entropy of the labeled tokens, each predicted by the hidden state before it (only
    those positions go through the LM head), and their count; per_row: both per row (tensors)."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(base.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:  # Gemma 2 (and Gemma 3 checkpoints that set it): the model's forward caps its logits so
        logits = torch.tanh(logits / cap) * cap
    if per_row:
        rows = keep.nonzero()[:, 0]
        losses = F.cross_entropy(logits, targets[keep], reduction="none")
        return (losses.new_zeros(len(labels)).index_add_(0, rows, losses),
                keep.sum(dim=1))
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())
