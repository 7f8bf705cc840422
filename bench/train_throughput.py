"""Benchmark 2: LoRA training throughput, jointopt's trainer against TRL's SFTTrainer as DSPy configures it.

    .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --bf16     # also jointopt in bf16
    .venv/bin/python bench/train_throughput.py --steps 3 --rows 100
    .venv/bin/python bench/train_throughput.py --shared-prefix-only   # just the shared-prefix ratios
    .venv/bin/python bench/train_throughput.py --shared-prefix-only --rounds 5   # more interleaved runs each

Rows: the DSPy fine-tune rows of the sst2 recipe's program with 4 labeled demos (the first 4 training
examples), built like `jointopt bootstrap ... traces.source=labels` builds them
(`jointcli.steps.traces.label_traces`, ChatAdapter): ~460 tokens each, ~19 of them the completion.

Trainers, each in its own child process (so that each peak RSS is its own), on the same rows, one
warm-up optimizer step then `--steps` measured ones of 8 rows each:
- jointopt: `jointcli.training.lora.train_lora` with the shipped recipe's settings (LoRA r=8 alpha 16,
  batch_size 2 x grad_accum 4) and its defaults (dtype auto: fp32 on CPU, micro-batches from a
  token budget, the rows' shared prompt prefix computed once per micro-batch, LM head on the
  completion positions only, no gradient checkpointing); `--bf16` adds a run with dtype bfloat16
  (autocast).
- dspy-trl: DSPy 3.4's `LocalProvider` (dspy/clients/lm_local.py, `train_sft_locally`) reproduced with
  current TRL/PEFT, because DSPy's own code fails with TRL 1.16 (`setup_chat_format` is gone,
  `max_seq_length` was renamed `max_length`): its LoRA config when `use_peft` (r=32, alpha 64,
  dropout 0.05, all-linear), per_device_train_batch_size=1 x gradient_accumulation_steps=8,
  max_length 4096, lr 1e-5 constant with 3% warmup (warmup_steps=0.03: transformers 5 dropped
  warmup_ratio), max_grad_norm 2.0, TRL's default
  gradient checkpointing (on), its labels (`encode_sft_example`, re-implemented here because it
  breaks on transformers 5: every non-assistant token masked, so the demos' answers train too),
  in fp32 (its default `bf16=True` is for GPUs). DSPy's default `packing=True` is NOT used by
  default: TRL 1.16 packs into 4096-token padding-free rows whose attention is quadratic in the
  whole pack, far slower here; `--packing` runs it anyway.
Then the shared prompt prefix against the same trainer without it (`train.share_prefix: false`:
every row runs whole), in rows per second: on the same rows with demos
(target 2.5x), and on rows without demos (short, ~210 tokens: sharing must not make them slower).
The two alternate in one child process, `--rounds` runs each (the order flips every round), and the
ratio is that of their median times: on a shared machine load hits both alike.

Throughput = trained tokens (non-pad prompt + completion tokens) of the measured steps / their
wall time. A shared prefix counts for every row that uses it: the figure is rows' tokens per second,
not tokens computed per second (jointopt computes the shared ~370 tokens of a step once).

Model FLOPs per trained token (the useful work, the same count for both trainers), for a decoder
with linear weights N_lin (frozen), LoRA weights N_lora, hidden size d, L layers, vocabulary V:
    4 * N_lin                 forward (2) + backward to the activations (2); frozen weights get no
                              weight gradient, so not the usual 6 * N
  + 6 * N_lora                forward, activation and weight gradients of the adapter
  + 6 * L * d * s_avg         causal attention scores and values (forward 2 * s * d per token with the
                              causal half, backward twice that), s_avg the mean row length
and once per completion (label) token: 4 * V * d (LM head forward + gradient to the hidden state).
Model FLOP utilization (MFU) = model FLOP/s / the machine's measured matmul peak (torch.matmul of
square matrices, in the dtype jointopt trained in). Model FLOPs count whole rows, so jointopt's
shared prefix (computed once per micro-batch) shows as useful work done without computing it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS_PER_STEP = 8


# ---------------------------------------------------------------- rows
def build_rows(n: int, demos: int = 4) -> list[dict]:
    import dspy

    from jointcli.data import load_splits
    from jointcli.program import build_program
    from jointcli.recipe import load_recipe
    from jointcli.steps.traces import label_traces

    recipe = load_recipe(ROOT / "recipes" / "sst2.yaml", [f"data.split.train={n + demos}"])
    splits = load_splits(recipe.data)
    program = build_program(recipe)
    ((name, predictor),) = program.named_predictors()
    predictor.demos = splits.train[:demos]
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        traces = label_traces(program, splits.train[demos:], "classify")
    return [{"messages": row["messages"]} for row in traces.rows]


# ---------------------------------------------------------------- matmul peak
def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of torch.matmul on n x n matrices (best of repeated runs)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


# ---------------------------------------------------------------- trainers (in a child process)
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jointopt(rows: list[dict], steps: int, out: Path, dtype: str = "auto", share_prefix: bool = True) -> dict:
    from transformers import AutoTokenizer

    from jointcli.recipe import EMBEDDED_MODEL, Lora, Train
    from jointcli.training.lora import train_lora
    from jointcli.training.microbatch import plan_steps
    from jointcli.training.rows import to_prompt_completion, tokenize_pair
    from jointcli.weights.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(EMBEDDED_MODEL)
    # the shipped sst2 recipe's settings
    train = Train(epochs=1, learning_rate=1e-3, batch_size=2, grad_accum=4, share_prefix=share_prefix)
    log = out / "log.jsonl"
    result = train_lora(
        checkpoint, rows, out / "adapter", Lora(r=8, alpha=16), train, seed=0, log_path=log, device="cpu", dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data = [tokenize_pair(tokenizer, p) for p in to_prompt_completion(rows)]
    plan = plan_steps(len(data), train.batch_size * train.grad_accum, train.epochs, 0)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    measured = plan[1:]  # step 1 is the warm-up
    tokens = sum(len(data[i][0]) for step in measured for i in step)
    labels = sum(len(data[i][0]) - data[i][1] for step in measured for i in step)
    seconds = lines[-1]["seconds"] - lines[0]["seconds"]
    name = "jointopt" + ("" if dtype == "auto" else f"-{dtype}") + ("" if share_prefix else "-unshared")
    return {
        "trainer": name,
        "dtype": result.dtype,
        "tokens": tokens,
        "label_tokens": labels,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "steps": len(measured),
        "rows_per_second": len(measured) * ROWS_PER_STEP / seconds,
        "losses": [round(e["loss"], 4) for e in lines],
        "peak_rss_mb": _rss_mb(),
        "mean_row_tokens": sum(len(d[0]) for d in data) / len(data),
    }


def run_dspy_trl(rows: list[dict], steps: int, out: Path, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from jointcli.recipe import EMBEDDED_MODEL
    from jointcli.weights.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(EMBEDDED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    max_seq_length = 4096
    dataset = Dataset.from_list([encode_sft_example(row["messages"], tokenizer, max_seq_length) for row in rows])
    row_tokens = [len(ids) for ids in dataset["input_ids"]]
    row_labels = [sum(1 for x in lab if x != -100) for lab in dataset["labels"]]
    peft_config = LoraConfig(
        r=32, lora_alpha=64, lora_dropout=0.05, bias="none", target_modules="all-linear", task_type="CAUSAL_LM"
    )
    config = SFTConfig(
        output_dir=str(out / "trl"),
        num_train_epochs=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=ROWS_PER_STEP,
        learning_rate=1e-5,
        max_grad_norm=2.0,
        logging_steps=1,
        warmup_steps=0.03,
        lr_scheduler_type="constant",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        max_length=max_seq_length,
        packing=packing,
        max_steps=steps + 1,
        dataset_kwargs={"add_special_tokens": False, "append_concat_token": False},
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        seed=0,
    )
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))

    trainer.add_callback(Losses())
    trainer.train()
    tokens = marks[-1][1] - marks[0][1]
    seconds = marks[-1][0] - marks[0][0]
    labels = (sum(row_labels) / len(row_labels)) * tokens / (sum(row_tokens) / len(row_tokens))
    return {
        "trainer": "dspy-trl" + ("-packing" if packing else ""),
        "dtype": "float32",
        "tokens": tokens,
        "label_tokens": labels,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "steps": len(marks) - 1,
        "losses": losses,
        "peak_rss_mb": _rss_mb(),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
    }


def encode_sft_example(messages: list[dict], tokenizer, max_seq_length: int) -> dict:
    """dspy.clients.lm_local.encode_sft_example (from open-instruct) for transformers 5, whose
    apply_chat_template returns a dict where DSPy expects a tensor: every token of a non-assistant
    message is masked (-100), so the assistant turns of the demos are trained on too."""

    def length(msgs, generation_prompt=False):
        enc = tokenizer.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=generation_prompt, truncation=True, max_length=max_seq_length
        )
        return len(enc["input_ids"] if hasattr(enc, "keys") else enc)

    enc = tokenizer.apply_chat_template(messages, tokenize=True, truncation=True, max_length=max_seq_length)
    input_ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    labels = list(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else length(messages[:i])
        nxt = i < len(messages) - 1 and messages[i + 1]["role"] == "assistant"
        end = length(messages[: i + 1], generation_prompt=nxt)
        labels[start:end] = [-100] * (end - start)
    return {"input_ids": input_ids, "labels": labels}


def _child(which: str, rows_file: Path, steps: int, packing: bool, rounds: int) -> dict:
    import torch

    from jointcli.weights.device import cpu_budget as _cpu_budget

    torch.set_num_threads(_cpu_budget())
    rows = json.loads(rows_file.read_text())
    if which == "shared-prefix":
        return interleaved_shared_prefix(rows, steps, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        if which.startswith("jointopt"):
            return run_jointopt(
                rows, steps, Path(tmp), "bfloat16" if which == "jointopt-bf16" else "auto", share_prefix=True
            )
        return run_dspy_trl(rows, steps, Path(tmp), packing)


# ---------------------------------------------------------------- FLOPs
def model_flops(result: dict, lora_r: int) -> float:
    from transformers import AutoConfig

    from jointcli.recipe import EMBEDDED_MODEL
    from jointcli.weights.checkpoint import resolve_checkpoint

    c = AutoConfig.from_pretrained(resolve_checkpoint(EMBEDDED_MODEL))
    d, L, V, f = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    n_lin = L * sum(i * o for i, o in shapes)
    n_lora = L * sum(lora_r * (i + o) for i, o in shapes)
    per_token = 4 * n_lin + 6 * n_lora + 6 * L * d * result["mean_row_tokens"]
    return per_token * result["tokens"] + 4 * V * d * result["label_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", type=int, default=100, help="fine-tune rows built (the trainers use the first (steps + 1) x 8)"
    )
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps of 8 rows, after 1 warm-up")
    parser.add_argument("--packing", action="store_true", help="also run DSPy's packing=True (slow)")
    parser.add_argument("--bf16", action="store_true", help="also run jointopt in bf16 (auto is fp32 on CPU)")
    parser.add_argument("--shared-prefix-only", action="store_true", help="only the shared-prefix ratios")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved runs of each trainer for the shared-prefix ratios (median)"
    )
    parser.add_argument(
        "--child", choices=["jointopt", "jointopt-bf16", "dspy-trl", "shared-prefix"], help=argparse.SUPPRESS
    )
    parser.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.child:
        print(
            "RESULT " + json.dumps(_child(args.child, args.rows_file, args.steps, args.packing, args.rounds)),
            flush=True,
        )
        return

    import torch

    from jointcli.weights.device import cpu_budget as _cpu_budget

    torch.set_num_threads(_cpu_budget())
    rows = build_rows(args.rows)
    used = rows[: (args.steps + 1) * ROWS_PER_STEP]
    print(
        f"rows: {len(rows)} built (sst2 program, 4 labeled demos), {len(used)} trained by each trainer: "
        f"1 warm-up + {args.steps} measured optimizer steps of {ROWS_PER_STEP} rows; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    peaks = {dt: matmul_peak(dt) for dt in ("float32", "bfloat16")}
    print("matmul peak (2048x2048, GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))

    if args.shared_prefix_only:
        shared_prefix_ratios(rows, args.steps, args.rounds)
        return
    results = {}
    runs = (
        [("dspy-trl", False), ("jointopt", False)]
        + ([("jointopt-bf16", False)] if args.bf16 else [])
        + ([("dspy-trl", True)] if args.packing else [])
    )
    for which, packing in runs:
        r = run_child(which, used, args.steps, packing)
        results[r["trainer"]] = r

    # the machine is shared: the peak measured again after the trainers, the best of both counts
    peaks = {dt: max(v, matmul_peak(dt)) for dt, v in peaks.items()}
    print("matmul peak, best of before and after (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    ours, base = results["jointopt"], results["dspy-trl"]
    base.setdefault("mean_row_tokens", ours["mean_row_tokens"])
    for r, rank in [(ours, 8), (base, 32)] + ([(results["jointopt-bfloat16"], 8)] if args.bf16 else []):
        flops = model_flops(r, rank)
        peak = peaks[r["dtype"]]
        print(
            f"{r['trainer']:>18}: {flops / r['tokens'] / 1e6:.0f} model MFLOP/token, "
            f"{flops / r['seconds'] / 1e9:.1f} GFLOP/s, MFU {100 * flops / r['seconds'] / 1e9 / peak:.1f}% "
            f"of the {r['dtype']} matmul peak"
        )
    ratio = ours["tokens_per_second"] / base["tokens_per_second"]
    print(f"train_throughput: {ratio:.2f}x (target 1.5x)")
    shared_prefix_ratios(rows, args.steps, args.rounds)


def run_child(which: str, rows: list[dict], steps: int, packing: bool = False, rounds: int = 1) -> dict:
    """One trainer in its own process (its own peak RSS) on `rows`; prints and returns its figures
    (shared-prefix: both jointopt trainers, interleaved, returned without printing)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows))
        cmd = [
            sys.executable,
            __file__,
            "--child",
            which,
            "--rows-file",
            str(rows_file),
            "--steps",
            str(steps),
            "--rounds",
            str(rounds),
        ] + (["--packing"] if packing else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT ") :])
    if which == "shared-prefix":
        return r
    print(
        f"{r['trainer']:>18}: {r['tokens_per_second']:7.1f} tokens/s ({r['tokens']} tokens in "
        f"{r['seconds']:.1f} s, {r['steps']} steps, {r['dtype']}), peak RSS {r['peak_rss_mb']:.0f} MB, "
        f"losses {r['losses']}",
        flush=True,
    )
    return r


def interleaved_shared_prefix(rows: list[dict], steps: int, rounds: int) -> dict:
    """jointopt's trainer with and without the shared prefix, alternating in this process `rounds` times
    each (the order flips every round), on the same rows: load on a shared machine hits both alike.
    Per trainer: the measured seconds of every run and the losses of the last."""
    out = {"shared": {"seconds": []}, "unshared": {"seconds": []}}
    for r in range(rounds):
        for share in (True, False) if r % 2 == 0 else (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                result = run_jointopt(rows, steps, Path(tmp), share_prefix=share)
            entry = out["shared" if share else "unshared"]
            entry["seconds"].append(result["seconds"])
            entry.update(
                losses=result["losses"],
                dtype=result["dtype"],
                rows=result["steps"] * ROWS_PER_STEP,
                mean_row_tokens=result["mean_row_tokens"],
            )
    return out


def shared_prefix_ratios(rows: list[dict], steps: int, rounds: int) -> None:
    """Rows per second with the shared prefix against without it (median of interleaved runs): rows
    with demos, then without."""
    from statistics import median

    from jointcli.weights.device import cpu_kind

    used = rows[: (steps + 1) * ROWS_PER_STEP]
    cases = [
        ("shared_prefix", "rows with 4 demos", used, "2.5x"),
        ("shared_prefix_short_rows", "rows without demos", build_rows(len(used), demos=0), ">= 1.0x"),
    ]
    for name, what, case_rows, target in cases:
        r = run_child("shared-prefix", case_rows, steps, rounds=rounds)
        shared, unshared = r["shared"], r["unshared"]
        for label, e in (("shared prefix", shared), ("every row whole", unshared)):
            print(
                f"{label:>16}: {e['rows'] / median(e['seconds']):.2f} rows/s (median of "
                f"{', '.join(f'{x:.1f}' for x in e['seconds'])} s for {e['rows']} rows, "
                f"{e['mean_row_tokens']:.0f} tokens a row), losses {e['losses']}",
                flush=True,
            )
        if shared["losses"] != unshared["losses"]:
            print(f"  WARNING: the losses differ: {shared['losses']} vs {unshared['losses']}")
        ratio = median(unshared["seconds"]) / median(shared["seconds"])
        print(
            f"{name}: {ratio:.2f}x rows/s, {what} (target {target}) "
            f"[cpu {cpu_kind()}; LoRA {shared['dtype']}; {rounds} interleaved runs each]",
            flush=True,
        )


if __name__ == "__main__":
    main()
