"""Benchmark: one GRPO update, TRL's GRPOTrainer loss against jointopt's trainer, on the same rows.

    .venv/bin/python bench/grpo_loss.py
    .venv/bin/python bench/grpo_loss.py --examples 8 --rounds 5
    .venv/bin/python bench/grpo_loss.py --trl-checkpointing     # TRL with its default gradient checkpointing
    .venv/bin/python bench/grpo_loss.py --examples 1 --whole-rows   # also jointopt on whole rows
    .venv/bin/python bench/grpo_loss.py --examples 2 --equal-group  # a group of equal rewards: the normalizers
    .venv/bin/python bench/grpo_loss.py --examples 1 --temperature 1.0   # both score the logits as they are

Rows: `--examples` sst2 training sentences (recipes/sst2.yaml, its 4 labeled demos in the prompt, as
bench/train_throughput.py builds them), each answered 4 ways (the gold label, the other label, a
sentence, "neutral": completions of different lengths), reward 1 for the gold label; advantages per
group of 4 by `jointcli.training.grpo.advantages` (none is 0, so jointopt keeps every row). The
adapter is the recipe's g LoRA (r=8, alpha 16, all-linear) with its B matrices drawn at random
(seeded), so that every LoRA weight gets a gradient; fp32, one optimizer step on a batch (the ratio
is 1), beta 0, epsilon 0.2, the gradient norm clipped at 1.0 both ways.

Two ways, one process, the same starting adapter (copied weight for weight):
- TRL: a real `trl.GRPOTrainer` (TRL 1.16, built offline on CPU with `loss_type="dapo"`, `beta=0`,
  the LoRA as a `peft_config`, a reward function that returns 0 and a dataset of placeholder prompts:
  it never generates here) and its own loss code, `GRPOTrainer._compute_loss(model, inputs)`, on
  whole padded rows (prompt_ids/prompt_mask left-padded, completion_ids/completion_mask right-padded,
  advantages, num_items_in_batch = the batch's completion tokens), `--trl-batch` rows a backward
  (per_device_train_batch_size: the batch padded whole, then cut into slices, as TRL's
  _prepare_inputs cuts a generation batch; one backward on all 16 rows took 19 GB).
- jointopt: `GrpoPolicy.update(rows, advantages)` (training/grpo.py: micro-batches that share the
  group's prompt, the LM head on the answer positions only); `--whole-rows` adds it with
  train.share_prefix false (every row computed whole, as TRL computes them).
Both score the answers at the rollouts' temperature, `--temperature` (default: the sst2 g step's, 0.5):
TRL as its `temperature` setting, jointopt as GrpoSettings.temperature, the log-probabilities of
logits / temperature. `--equal-group` answers the last sentence 4 times with
its label: TRL's "dapo" loss divides by every completion token of the batch (num_items_in_batch),
jointopt's by those of the rows it keeps (it leaves out the rows whose advantage is 0).
Each way's optimizer is a recorder that keeps the clipped gradients and changes nothing, so every
update starts from the same adapter. Timed: rows -> tokens -> loss -> backward -> clip -> step, one
warm-up each, then `--rounds` alternated; best of them. Peak memory: the process RSS sampled every
5 ms during an update, above its level before (approximate: the allocator keeps freed pages).
Ends with one line `grpo loss: <TRL / jointopt seconds>x ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jointcli.weights.device import set_process_defaults

set_process_defaults()  # a benchmark is an entry point, like the CLI: before torch loads

ANSWERS = ["{gold}", "{other}", "The sentiment of this sentence is {gold}.", "neutral"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=4, help="sst2 training sentences, 4 answers each")
    ap.add_argument("--rounds", type=int, default=3, help="alternated timed updates of each way")
    ap.add_argument("--trl-batch", type=int, default=4, help="TRL's per_device_train_batch_size (rows a backward)")
    ap.add_argument(
        "--equal-group", action="store_true", help="the last sentence answered 4 times with its label: advantages 0"
    )
    ap.add_argument(
        "--whole-rows", action="store_true", help="also jointopt without the shared prefix (train.share_prefix false)"
    )
    ap.add_argument(
        "--temperature", type=float, help="the rollouts' temperature both score at (default: recipes/sst2.yaml's g)"
    )
    ap.add_argument("--trl-checkpointing", action="store_true", help="TRL with gradient checkpointing (its default)")
    args = ap.parse_args()
    if args.equal_group and args.examples < 2:
        ap.error("--equal-group needs --examples 2 or more: one group must have unequal rewards")
    return args


# ---------------------------------------------------------------- rows
def build_groups(n: int, equal_last: bool = False) -> tuple[list[dict], list[float]]:
    """n sentences x 4 answers (DSPy chat rows) and their group-relative advantages; with `equal_last`
    the last sentence's 4 answers are all its label (equal rewards: advantages 0)."""
    from bench.train_throughput import build_rows
    from jointcli.training.grpo import advantages

    rows, advs = [], []
    for k, row in enumerate(build_rows(n)):
        *prompt, answer = row["messages"]
        gold = "positive" if "\npositive\n" in answer["content"] else "negative"
        other = "negative" if gold == "positive" else "positive"
        rewards = []
        for template in ["{gold}"] * len(ANSWERS) if equal_last and k == n - 1 else ANSWERS:
            text = template.format(gold=gold, other=other)
            content = answer["content"].replace(f"\n{gold}\n", f"\n{text}\n")
            rows.append({"messages": [*prompt, {"role": "assistant", "content": content}]})
            rewards.append(float(text == gold))
        advs += advantages(rewards)
    return rows, advs


class Recorder:
    """An optimizer that keeps the gradients it is stepped with and changes no weight."""

    def __init__(self, named: dict):
        self.named = named
        self.param_groups = [{"params": list(named.values()), "lr": 0.0, "peak_lr": 0.0}]
        self.grads: dict = {}

    def step(self) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in self.named.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.named.values():
            p.grad = None


def lora_params(model) -> dict:
    """The trainable LoRA weights by a name both PEFT wrappings share."""
    return {n.replace("base_model.model.", ""): p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- the two ways
def jointopt_policy(recipe, seed: int, temperature: float):
    """GrpoPolicy with the recipe's g settings, its LoRA B matrices drawn at random, and a Recorder."""
    import torch

    from jointcli.recipe import EMBEDDED_MODEL
    from jointcli.training.grpo import GrpoJob, GrpoPolicy, GrpoSettings
    from jointcli.weights.checkpoint import resolve_checkpoint

    g = recipe.optimizers["g"]
    settings = GrpoSettings(g.epsilon, g.beta, g.iterations, temperature)
    job = GrpoJob(resolve_checkpoint(EMBEDDED_MODEL), g.lora, g.train, settings, "cpu", "float32", seed, None)
    policy = GrpoPolicy(job)
    named = lora_params(policy.state.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    policy.state.optimizer = Recorder(named)
    return policy


def jointopt_update(policy, rows: list[dict], advs: list[float], share_prefix: bool) -> dict:
    """GrpoPolicy.update with train.share_prefix set as asked."""
    train = policy.job.train.model_copy(update={"share_prefix": share_prefix})
    policy.job = dataclasses.replace(policy.job, train=train)
    return policy.update(rows, advs)


def trl_trainer(policy, group: int, n_rows: int, batch: int, out: str, checkpointing: bool, temperature: float):
    """A real GRPOTrainer on the embedded model with the same LoRA (r, alpha, targets), its adapter
    weights copied from the policy's."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from jointcli.weights.adapter import lora_config
    from jointcli.weights.checkpoint import load_causal_lm

    job = policy.job
    args = GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        gradient_checkpointing=checkpointing, loss_type="dapo", beta=job.grpo.beta, epsilon=job.grpo.epsilon,
        num_iterations=job.grpo.iterations, num_generations=group, per_device_train_batch_size=batch,
        gradient_accumulation_steps=n_rows // batch, max_completion_length=32, max_grad_norm=1.0,
        learning_rate=job.train.learning_rate, seed=job.seed, temperature=temperature,
    )  # fmt: skip

    def no_reward(completions, **kwargs):
        return [0.0] * len(completions)

    model = load_causal_lm(job.checkpoint, torch.float32)
    dataset = Dataset.from_dict({"prompt": ["unused: the rows come from the benchmark"] * n_rows})
    trainer = GRPOTrainer(
        model=model, reward_funcs=no_reward, args=args, train_dataset=dataset,
        processing_class=policy.tokenizer, peft_config=lora_config(job.lora),
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = n_rows // batch  # set by Trainer's loop, which does not run here
    trainer.model.train()
    named, source = lora_params(trainer.model), lora_params(policy.state.model)
    assert named.keys() == source.keys(), "the two LoRA adapters differ in their weights"
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(source[name])
    trainer.optimizer = Recorder(named)
    return trainer


def trl_inputs(tokenizer, pad_id: int, rows: list[dict], advs: list[float]) -> dict:
    """TRL's batch for `_compute_loss`: prompts left-padded, completions right-padded, as
    `_generate_and_score_completions` hands them on."""
    import torch

    from jointcli.training.rows import to_prompt_completion, tokenize_pair

    pairs = [tokenize_pair(tokenizer, p) for p in to_prompt_completion(rows)]
    prompts, completions = [ids[:s] for ids, s in pairs], [ids[s:] for ids, s in pairs]
    lp, lc = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.tensor([[pad_id] * (lp - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (lp - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [pad_id] * (lc - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (lc - len(c)) for c in completions])
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(advs, dtype=torch.float32),
        "num_items_in_batch": completion_mask.sum(),
    }


def trl_update(trainer, tokenizer, pad_id: int, rows: list[dict], advs: list[float]) -> dict:
    """One TRL update: the batch padded whole, then cut into per_device_train_batch_size slices that keep
    the whole batch's num_items_in_batch (as GRPOTrainer's _prepare_inputs cuts a generation batch);
    its loss and a backward on each, the norm clipped at max_grad_norm, a step."""
    import torch

    from jointcli.weights.device import cpu_budget, torch_threads

    batch, loss = trainer.args.per_device_train_batch_size, 0.0
    with torch_threads(cpu_budget()):  # the thread count jointopt's update uses
        inputs = trl_inputs(tokenizer, pad_id, rows, advs)
        for start in range(0, len(rows), batch):
            part = {k: v if v.dim() == 0 else v[start : start + batch] for k, v in inputs.items()}
            part_loss = trainer._compute_loss(trainer.model, part)
            part_loss.backward()
            loss += float(part_loss.detach())
        params = trainer.optimizer.param_groups[0]["params"]
        norm = torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    mask, adv = inputs["completion_mask"], inputs["advantages"]
    tokens = int(inputs["prompt_mask"].sum() + mask.sum())
    return {"loss": loss, "grad_norm": float(norm), "tokens": tokens, "completion_tokens": int(mask.sum()),
            "nonzero_adv_completion_tokens": int(mask[adv != 0].sum())}  # fmt: skip


# ---------------------------------------------------------------- measuring
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured(fn):
    """(fn's result, seconds, peak RSS above the level before in MB)."""
    start_rss, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
    return result, seconds, max(peak[0], _rss_mb()) - start_rss


def compare(name: str, trl: dict, joint: dict) -> float:
    """Prints the loss, norm and gradient agreement of TRL's first update and a jointopt way's
    ({"figures", "grads"}); returns the max abs difference of the clipped gradients."""
    a, b, grads = trl["figures"], joint["figures"], trl["grads"]
    diff = max(float((grads[n] - joint["grads"][n]).abs().max()) for n in grads)
    scale = max(float(g.abs().max()) for g in grads.values())
    print(f"TRL vs {name}:")
    print(f"  loss       TRL {a['loss']:+.8f}   {name} {b['loss']:+.8f}   diff {a['loss'] - b['loss']:+.2e}")
    print(f"  grad norm  TRL {a['grad_norm']:.8f}   {name} {b['grad_norm']:.8f}   (before the clip)")
    print(f"  clipped LoRA gradients ({len(grads)} tensors): max abs diff {diff:.2e}, max abs {scale:.2e}")
    return diff


def equal_group_note(trl: dict, joint: dict) -> None:
    """With a group of equal rewards: TRL divides by every completion token of the batch (its
    num_items_in_batch), jointopt by those of the rows it keeps (advantage not 0)."""
    share = trl["nonzero_adv_completion_tokens"] / trl["completion_tokens"]
    print(
        f"  equal-reward group: TRL/jointopt loss {trl['loss'] / joint['loss']:.4f}, grad norm (before the clip) "
        f"{trl['grad_norm'] / joint['grad_norm']:.4f}; completion tokens of the rows with an advantage / all "
        f"{trl['nonzero_adv_completion_tokens']}/{trl['completion_tokens']} = {share:.4f}"
    )


def timed_rounds(ways: dict, rounds: int, peaks: dict) -> dict:
    """Seconds of `rounds` alternated updates of each way (the order turns every round); raises peaks."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            _, seconds, peak = measured(ways[name])
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in ways), flush=True)
    return times


def setup(args):
    """The rows, the two trainers and the ways to update: {name: () -> figures, and its Recorder}."""
    from jointcli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "sst2.yaml")
    rows, advs = build_groups(args.examples, args.equal_group)
    if args.temperature is None:
        args.temperature = recipe.optimizers["g"].temperature
    policy = jointopt_policy(recipe, recipe.seed, args.temperature)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(
            policy, len(ANSWERS), len(rows), args.trl_batch, out, args.trl_checkpointing, args.temperature
        )
    tok, pad = policy.tokenizer, policy.pad_id
    ways = {"TRL": (lambda: trl_update(trainer, tok, pad, rows, advs), trainer.optimizer)}
    ways["jointopt"] = (lambda: jointopt_update(policy, rows, advs, True), policy.state.optimizer)
    if args.whole_rows:
        ways["jointopt whole rows"] = (lambda: jointopt_update(policy, rows, advs, False), policy.state.optimizer)
    return rows, ways


def main():
    args = parse_args()
    import torch

    from jointcli.weights.device import cpu_kind

    rows, ways = setup(args)
    print(
        f"workload: {args.examples} sst2 sentences x {len(ANSWERS)} answers = {len(rows)} rows, 4 labeled demos, "
        f"fp32, LoRA r=8 alpha 16; TRL {args.trl_batch} rows a backward, temperature {args.temperature}, gradient checkpointing "
        f"{'on' if args.trl_checkpointing else 'off'}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    first = {}
    for name, (fn, recorder) in ways.items():  # also the warm-up
        figures, _, peak = measured(fn)
        first[name] = {"figures": figures, "grads": recorder.grads, "peak": peak}
    diffs = {name: compare(name, first["TRL"], first[name]) for name in ways if name != "TRL"}
    if args.equal_group:
        equal_group_note(first["TRL"]["figures"], first["jointopt"]["figures"])
    peaks = {name: first[name]["peak"] for name in ways}
    times = timed_rounds({name: fn for name, (fn, _) in ways.items()}, args.rounds, peaks)
    best = {name: min(v) for name, v in times.items()}
    for name in ways:
        print(f"  {name}: best {best[name]:.2f} s an update, {best['TRL'] / best[name]:.2f}x TRL's speed, "
              f"peak RSS +{peaks[name]:.0f} MB")  # fmt: skip
    loss_diff = abs(first["TRL"]["figures"]["loss"] - first["jointopt"]["figures"]["loss"])
    print(
        f"grpo loss: {best['TRL'] / best['jointopt']:.2f}x [TRL {best['TRL']:.2f} s vs jointopt "
        f"{best['jointopt']:.2f} s an update, best of {args.rounds}; loss diff {loss_diff:.1e}, "
        f"grad max abs diff {diffs['jointopt']:.1e}; {len(rows)} rows; cpu {cpu_kind()}]"
    )


if __name__ == "__main__":
    main()
