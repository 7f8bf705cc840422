"""The optimizer steps of a training and the micro-batches of each: planning under a token budget,
collation, and the loss of the completion tokens, with a prompt prefix shared by the rows computed once.

- steps (`plan_steps`): an optimizer step is `batch_size x grad_accum` rows, from a fresh seeded
  shuffle every epoch (training/curriculum.py orders them easy to hard instead);
- groups and micro-batches (`plan_step`): an optimizer step's rows are grouped by the prompt prefix
  they share (`prefix_groups`: rows of one module start with the same system message and demos,
  most of a row on sst2), and each group is cut into micro-batches of at most a token budget of
  computed tokens (`micro_batches`: sorted by length, so rows of similar length share a batch and
  little is padded; none when a micro-batch has one row or rows of one length, and then no
  attention mask either), so memory is bounded whatever the recipe's batch size. Micro-batches give
  the gradient of the whole step (tested); `train.share_prefix: false` plans every row whole;
- shared prefix (`SharedPrefix`, `micro_batch_losses`): a group's prefix (MIN_SHARED_PREFIX+ tokens)
  goes through the decoder once per optimizer step (batch 1, with gradients) and its key/value
  cache, repeated for every row, serves the rows' own suffixes, micro-batch after micro-batch (the
  prefix stops before the token that predicts the first completion token). Each suffix's backward
  leaves its share of the prefix's gradient on the cache; after the group's last micro-batch their
  sum goes through the prefix's computation once. A step then costs prefix + rows x suffix tokens
  instead of rows x whole rows. Same loss and LoRA gradients as whole rows (tested); LoRA dropout,
  if any, draws one mask for the shared part;
- completion-only LM head (`completion_nll`): the decoder body gives hidden states and only the
  label positions (a few dozen of a row's hundreds of tokens) go through the LM head, instead of the
  [batch, seq, vocab] fp32 logits of the whole rows and their gradient. Same loss as the model's own
  (tested).

A row is (token ids of prompt + completion, index of the first completion token), as
`rows.tokenize_pair` gives it; the loss is on the completion tokens only.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence

from ..weights.compat import cache_keyword
from ..weights.soft_prompt import model_inputs

# Rows whose common token prefix is at least this long compute it once (batch 1) and run their own
# suffixes against its key/value cache; a shorter prefix is not worth a second pass.
MIN_SHARED_PREFIX = 32

Row = tuple[list[int], int]  # token ids of prompt + completion, index of the first completion token
Group = tuple[int, list[list[int]]]  # (prefix tokens its rows share, computed once; 0: none), its micro-batches


def _common_len(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


def plan_steps(
    n_rows: int, rows_per_step: int, epochs: float, seed: int, *, steps: int | None = None
) -> list[list[int]]:
    """Row indices of every optimizer step: a fresh seeded shuffle each epoch, cut into steps of
    `rows_per_step` (the last of an epoch may be shorter); ceil(epochs x steps per epoch) steps, or
    `steps` when given (Train.optimizer_steps: a recipe's train.steps, or its floor min_steps).

    >>> [len(step) for step in plan_steps(10, 4, 2.0, seed=3)]  # 2 epochs of 10 rows, 4 a step
    [4, 4, 2, 4, 4, 2]
    >>> [len(step) for step in plan_steps(10, 4, 0, seed=3, steps=4)]  # 4 steps: an epoch and a step
    [4, 4, 2, 4]
    """
    per_epoch = math.ceil(n_rows / rows_per_step)
    total = steps if steps is not None else max(1, math.ceil(epochs * per_epoch - 1e-9))
    planned: list[list[int]] = []
    epoch = 0
    while len(planned) < total:
        order = list(range(n_rows))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        planned += [order[i : i + rows_per_step] for i in range(0, n_rows, rows_per_step)]
        epoch += 1
    return planned[:total]


def plan_step(lengths: Sequence[int], step: list[int], token_budget: int, rows: list[Row] | None = None) -> list[Group]:
    """One optimizer step's rows as groups that share a prompt prefix, each (the prefix's token count,
    0 for none; its micro-batches). A group's prefix is computed once and stays in memory while its
    micro-batches run, each costing rows x its longest suffix, within `token_budget` less the prefix.
    The rows that share no prefix with another form one group without a prefix (micro-batches of rows
    x longest row), as do all rows without `rows` (token ids: pass None to run every row whole)."""
    if rows is None:
        return [(0, micro_batches(lengths, step, token_budget))]
    out: list[Group] = []
    alone: list[int] = []
    for group in prefix_groups(step, rows):
        prefix = shared_prefix([rows[i] for i in group])
        if prefix:
            own = {i: lengths[i] - prefix for i in group}
            out.append((prefix, micro_batches(own, group, token_budget - prefix)))
        else:
            alone += group
    if alone:
        out.append((0, micro_batches(lengths, alone, token_budget)))
    return out


def prefix_groups(step: list[int], rows: list[Row]) -> list[list[int]]:
    """The step's rows in groups that share a prompt prefix worth computing once. Sorted by their
    tokens, rows that share a prefix lie next to each other (and a run's common prefix is that of
    its first and last rows); a row joins the group before it when the tokens the group then saves,
    (rows - 1) x its shared prefix, are no fewer than before: two modules whose prompts share only
    their first lines stay apart."""
    groups: list[list[int]] = []
    saved = first_start = shortest = 0  # of the last group
    for i in sorted(step, key=lambda i: (rows[i][0], i)):
        ids, start = rows[i]
        if groups:
            group = groups[-1]
            c = _common_len(rows[group[0]][0], ids)
            f, s = min(first_start, start), min(shortest, len(ids))
            joined = len(group) * _shared_len(c, f, s, len(group) + 1)
            if joined > 0 and joined >= saved:
                group.append(i)
                saved, first_start, shortest = joined, f, s
                continue
        groups.append([i])
        saved, first_start, shortest = 0, start, len(ids)
    return groups


def micro_batches(lengths: Sequence[int] | Mapping[int, int], step: list[int], token_budget: int) -> list[list[int]]:
    """Split rows into micro-batches of similar length (sorted, longest first), each at most
    `token_budget` computed tokens, rows x its longest row (padded tokens); a longer row goes alone."""
    order = sorted(step, key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= token_budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _shared_len(common: int, first_start: int, shortest: int, n_rows: int) -> int:
    """Prefix tokens a group computes once: its rows' common prefix, cut so that the hidden state
    predicting each row's first completion token (at first_start - 1) and at least one token of
    every row stay in the suffix; 0 (no sharing) for one row or a prefix under MIN_SHARED_PREFIX."""
    shared = min(common, first_start - 1, shortest - 1)
    return shared if n_rows > 1 and shared >= MIN_SHARED_PREFIX else 0


def shared_prefix(rows: list[Row]) -> int:
    """Tokens at the start of every row that a group computes once (see _shared_len); 0: none."""
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
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, start : len(ids)] = input_ids[r, start : len(ids)]
        mask[r, : len(ids)] = 1
    padded = bool((mask == 0).any())
    return (input_ids.to(device), mask.to(device) if padded else None, labels.to(device))


def completion_nll(
    model, input_ids, attention_mask, labels, soft=None, per_row: bool = False, temperature: float = 1.0
):
    """Summed cross-entropy of the labeled (completion) tokens, and their count.

    The decoder body gives hidden states; only the positions whose next token has a label go
    through the LM head (~20 of ~500 here), so the [batch, seq, vocab] logits of the full model
    are never built. Same value as the model's own loss x the number of label tokens.
    soft: the soft prompt [n, hidden] that negative ids stand for (soft_prompt.py), if any.
    per_row: each row's summed cross-entropy and label count instead (tensors, one entry a row).
    temperature: of the distribution the tokens are scored under, softmax(logits / temperature)."""
    base, body = _base_and_body(model)
    hidden = body(
        **model_inputs(base, input_ids, soft), attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return _label_nll(base, hidden, labels, per_row, temperature)


def collate_shared(rows: list[Row], prefix_len: int, pad_id: int, device: str = "cpu"):
    """The rows' shared first `prefix_len` tokens [1, prefix_len], then `collate_suffixes`."""
    import torch

    return (torch.tensor([rows[0][0][:prefix_len]], device=device), *collate_suffixes(rows, prefix_len, pad_id, device))


def collate_suffixes(rows: list[Row], prefix_len: int, pad_id: int, device: str = "cpu"):
    """The rows' own suffixes after their shared first `prefix_len` tokens, as `collate` gives them
    (right-padded input_ids, attention_mask over prefix + suffix or None when nothing is padded,
    labels), plus their position ids (continuing after the prefix)."""
    import torch

    prefix = rows[0][0][:prefix_len]
    if not all(ids[:prefix_len] == prefix and start > prefix_len for ids, start in rows):
        raise ValueError(f"rows do not share {prefix_len} prompt tokens before their completions")
    input_ids, mask, labels = collate([(ids[prefix_len:], start - prefix_len) for ids, start in rows], pad_id)
    if mask is not None:
        mask = torch.cat([mask.new_ones((len(rows), prefix_len)), mask], dim=1)
    positions = torch.arange(prefix_len, prefix_len + input_ids.shape[1])[None].expand(len(rows), -1)
    return (
        input_ids.to(device),
        mask.to(device) if mask is not None else None,
        labels.to(device),
        positions.to(device),
    )


def shared_completion_nll(
    model, prefix_ids, input_ids, attention_mask, labels, position_ids, soft=None, per_row: bool = False
):
    """completion_nll of rows that start with the same `prefix_ids` (batch 1), as `collate_shared`
    gives them, in one micro-batch: the prefix goes through the decoder once and its key/value cache,
    repeated for every row, serves the rows' own suffixes (autograd sums the rows' gradients into the
    one prefix computation). Same loss and gradients as completion_nll on the whole rows (tested)."""
    return SharedPrefix(model, prefix_ids, soft).nll(input_ids, attention_mask, labels, position_ids, per_row)


class SharedPrefix:
    """A prompt prefix (`prefix_ids`, batch 1) computed once, whose key/value cache serves the suffixes
    of one or several micro-batches (`nll`). Every label and the hidden state predicting it lie in the
    suffix.

    detach=False: the suffixes' gradients flow straight through the cache into the prefix's
    computation (one micro-batch). detach=True (several micro-batches): the cache is a detached fp32
    copy, each suffix's backward pass leaves its share of the prefix's gradient there, and `backward()`
    sends their sum through the prefix's computation once, after the last micro-batch."""

    def __init__(self, model, prefix_ids, soft=None, detach: bool = False):
        import torch
        from transformers import DynamicCache

        self.base, self.body = _base_and_body(model)
        self.soft, self.length = soft, prefix_ids.shape[1]
        self.cache_kw = cache_keyword(self.body)
        cache = DynamicCache(config=self.base.config)
        self.body(**model_inputs(self.base, prefix_ids, soft), use_cache=True, **{self.cache_kw: cache})
        if cache.get_seq_length() != self.length:  # the cache keyword was ignored: never train on a wrong loss
            raise RuntimeError(f"the decoder did not fill the prefix cache passed as {self.cache_kw!r}")
        self.cache = cache
        self.computed = [(layer.keys, layer.values) for layer in cache.layers]
        self.detached = detach and torch.is_grad_enabled()
        self.kv = (
            [(k.detach().float().requires_grad_(), v.detach().float().requires_grad_()) for k, v in self.computed]
            if self.detached
            else self.computed
        )

    def nll(self, input_ids, attention_mask, labels, position_ids, per_row: bool = False, temperature: float = 1.0):
        """completion_nll of the rows' suffixes (as `collate_suffixes` gives them) after the prefix."""
        import copy

        n, width = input_ids.shape
        # a copy of the prefix's cache whose layers hold its keys and values (or their detached copies)
        # repeated for every row; the copies keep what else a layer knows (a sliding window's length)
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer, (k, v), (k0, _) in zip(cache.layers, self.kv, self.computed):
            layer.keys, layer.values = (t.to(k0.dtype).expand(n, -1, -1, -1) for t in (k, v))
        hidden = self.body(
            **model_inputs(self.base, input_ids, self.soft),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: cache},
        ).last_hidden_state
        if cache.get_seq_length() != self.length + width:
            raise RuntimeError(f"the decoder did not use the prefix cache passed as {self.cache_kw!r}")
        if bool((labels[:, 0] != -100).any()):
            raise ValueError("a label on the first suffix token: its predicting hidden state is in the prefix")
        return _label_nll(self.base, hidden, labels, per_row, temperature)

    def backward(self) -> None:
        """The summed gradient the suffixes left on the detached cache, through the prefix's computation."""
        import torch

        if not self.detached:
            return
        pairs = [
            (t, leaf.grad)
            for kv, leaves in zip(self.computed, self.kv)
            for t, leaf in zip(kv, leaves)
            if leaf.grad is not None
        ]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
        self.kv = []


def micro_batch_losses(
    model,
    rows: list[Row],
    groups: list[Group],
    pad_id: int,
    device: str,
    soft=None,
    per_row: bool = False,
    temperature: float = 1.0,
) -> Iterator[tuple[list[int], object, object]]:
    """(row indices, summed NLL of their completion tokens, label count) of every micro-batch of
    `groups` (plan_step's), one after the other; `per_row` and `temperature` as completion_nll's. A
    group's prefix is computed once; when gradients are on, the caller calls backward() on each
    micro-batch's loss before asking for the next one, and the prefix's share of the gradient goes
    through its computation after the group's last micro-batch."""
    import torch

    for prefix, micros in groups:
        shared = None
        if prefix:
            shared = SharedPrefix(
                model, torch.tensor([rows[micros[0][0]][0][:prefix]], device=device), soft, detach=True
            )
        for micro in micros:
            batch = [rows[i] for i in micro]
            if shared is not None:
                suffixes = collate_suffixes(batch, prefix, pad_id, device)
                nll, count = shared.nll(*suffixes, per_row=per_row, temperature=temperature)
            else:
                rows_in = collate(batch, pad_id, device)
                nll, count = completion_nll(model, *rows_in, soft=soft, per_row=per_row, temperature=temperature)
            yield micro, nll, count
        if shared is not None:
            shared.backward()


def _base_and_body(model):
    """(the causal LM under a PEFT wrapper, if any; its decoder body, without the LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    return base, body


def _label_nll(base, hidden, labels, per_row: bool = False, temperature: float = 1.0):
    """Summed cross-entropy of the labeled tokens, each predicted by the hidden state before it (only
    those positions go through the LM head), under softmax(logits / temperature), and their count;
    per_row: both per row (tensors)."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(base.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:  # Gemma 2 (and Gemma 3 checkpoints that set it): the model's forward caps its logits so
        logits = torch.tanh(logits / cap) * cap
    if temperature != 1.0:  # GRPO: the distribution its rollouts were sampled from, as TRL scores them
        logits = logits / temperature
    if per_row == "token":  # every label token's cross-entropy, row after row, and each row's count (grpo.py)
        return F.cross_entropy(logits, targets[keep], reduction="none"), keep.sum(dim=1)
    if per_row:
        rows = keep.nonzero()[:, 0]
        losses = F.cross_entropy(logits, targets[keep], reduction="none")
        return (losses.new_zeros(len(labels)).index_add_(0, rows, losses), keep.sum(dim=1))
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())
