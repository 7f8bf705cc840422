"""Benchmark 1: evaluation throughput of a fine-tuned DSPy module on the embedded model.

    .venv/bin/python bench/eval_throughput.py                      # trains a quick adapter first
    .venv/bin/python bench/eval_throughput.py --adapter runs/sst2/02-w/adapters/classify --n 50
    .venv/bin/python bench/eval_throughput.py models.small.limits.max_batch=8   # recipe overrides

The workload is recipes/sst2.yaml's module with 4 labeled demos (LabeledFewShot k=4, as the
recipe's p step starts) and a LoRA adapter, evaluated on the SST-2 dev split with dspy.Evaluate
and the recipe's threads (runtime.num_threads), DSPy's cache off. Engines, all in this process, same prompts:

- naive: defined below; one `model.generate` per call under a lock, fp32, the adapter through
  PEFT, no batching, no prefix reuse: what a straightforward transformers engine does;
- jointopt: jointcli.inference.engine.LocalEngine with its defaults (dtype auto = bf16 on a CPU with
  avx512_bf16, batching, shared-prefix reuse);
- jointopt fp32 (unless --no-fp32): the same engine in float32, to separate numerics from the rest.

Prints examples/second and dev accuracy per engine, and ends with one line
`eval_throughput: <jointopt / naive>x (target 4x)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jointcli.inference.model_id import adapter_model_id
from jointcli.models import build_lm
from jointcli.weights.checkpoint import resolve_checkpoint
from jointcli.weights.device import set_process_defaults

set_process_defaults()  # a benchmark is an entry point, like the CLI: before torch loads


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="dev examples (the recipe's dev split has 50)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="dspy.Evaluate threads (default: the recipe's runtime.num_threads, what jointopt uses)",
    )
    ap.add_argument("--adapter", type=Path, help="a PEFT LoRA folder; default: train a quick one here")
    ap.add_argument(
        "--random-adapter",
        action="store_true",
        help="no training: a PEFT LoRA with random A and B matrices (outputs are then not SST-2-like)",
    )
    ap.add_argument("--train-rows", type=int, default=16, help="label rows for the quick adapter")
    ap.add_argument("--keep-adapter", type=Path, help="train the quick adapter into this folder (reuse with --adapter)")
    ap.add_argument("--no-fp32", action="store_true", help="skip jointopt in float32")
    ap.add_argument("overrides", nargs="*", help="recipes/sst2.yaml overrides, e.g. models.small.limits.max_batch=8")
    return ap.parse_args()


# ---------------------------------------------------------------- the naive engine
class NaiveEngine:
    """A DSPy 3.4 engine the obvious way: fp32 weights with the adapter on top through PEFT, and one
    `model.generate` per request, one request at a time (a lock: DSPy calls from many threads)."""

    def __init__(self, checkpoint: Path, adapter: Path):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
        self.model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False).eval()
        self.lock = threading.Lock()
        self.calls = 0

    def complete(self, request):
        from dspy.lm15 import Message, Response, Usage

        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [{"role": m.role, "content": m.text} for m in request.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        max_new = request.config.max_tokens or 512
        with self.lock, self.torch.inference_mode():
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = self.model.generate(
                input_ids=ids,
                attention_mask=self.torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = out[0, ids.shape[1] :].tolist()
            answer = self.tokenizer.decode(new, skip_special_tokens=True)
            self.calls += 1
        for stop in request.config.stop or ():
            answer = answer.split(stop)[0]
        finish = "length" if len(new) >= max_new and new[-1] != self.tokenizer.eos_token_id else "stop"
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant(answer),
            finish_reason=finish,
            usage=Usage(input_tokens=ids.shape[1], output_tokens=len(new)),
        )


# ---------------------------------------------------------------- workload
def workload(n: int, overrides: list[str]):
    import dspy

    from jointcli.data import load_splits
    from jointcli.metrics import build_metric
    from jointcli.program import build_program
    from jointcli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "sst2.yaml", overrides)
    splits = load_splits(recipe.data)
    program = dspy.LabeledFewShot(k=4).compile(build_program(recipe), trainset=splits.train)
    metric = build_metric(recipe.metric, recipe.label_field)
    return recipe, splits, program, metric, splits.dev[:n]


def quick_adapter(args, recipe, splits, program, folder: Path) -> str:
    """Returns a description of the adapter it put in `folder`."""
    checkpoint = resolve_checkpoint(recipe.models["small"].path)
    if args.random_adapter:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        )
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.02)
        model.save_pretrained(folder)
        return "random-init PEFT LoRA (r=8, A and B ~ N(0, 0.02), untrained)"
    from jointcli.recipe import Lora, Train
    from jointcli.steps.traces import label_traces
    from jointcli.training.lora import train_lora

    rows = [r["messages"] for r in label_traces(program, splits.train[: args.train_rows], "classify").rows]
    train = Train(epochs=1, learning_rate=2e-3, batch_size=4)
    start = time.perf_counter()
    result = train_lora(
        checkpoint, [{"messages": m} for m in rows], folder, Lora(r=8, alpha=16), train, seed=0, device="cpu"
    )
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.3f}"
    return (
        f"quick LoRA trained here: {len(rows)} gold-label rows with the 4 demos, 1 epoch, "
        f"{result.steps} steps of 4, lr 2e-3, final loss {loss}, "
        f"{time.perf_counter() - start:.0f} s"
    )


def measure(label, lm, program, metric, devset, threads, engine=None):
    import dspy

    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    with dspy.context(lm=lm, adapter=adapter):
        for example in devset[:2]:  # warm-up: the first calls after loading are several times slower
            try:
                program(**example.inputs())
            except Exception:  # noqa: BLE001 - a parse failure is fine here
                pass
        if engine is not None:
            engine.decoder.stats.clear()
        evaluate = dspy.Evaluate(
            devset=devset,
            metric=metric,
            num_threads=threads,
            display_progress=False,
            max_errors=len(devset) + 1,
            provide_traceback=False,
        )
        start = time.perf_counter()
        result = evaluate(program)
        seconds = time.perf_counter() - start
    rate = len(devset) / seconds
    print(f"{label:<34} {rate:6.2f} ex/s  {seconds:7.1f} s  dev accuracy {result.score:5.1f}%", flush=True)
    return rate


def main():
    args = parse_args()
    import dspy
    import torch

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    recipe, splits, program, metric, devset = workload(args.n, args.overrides)
    args.threads = args.threads or recipe.runtime.num_threads
    spec = recipe.models["small"]
    print(
        f"workload: SST-2 dev, {len(devset)} examples, {args.threads} threads, sst2 module with "
        f"{len(program.classify.demos)} labeled demos + LoRA, max_tokens {spec.max_tokens}, greedy, "
        f"engine limits {spec.limits.model_dump()}; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter
        if adapter is None:
            adapter = args.keep_adapter or Path(tmp) / "adapter"
            print("adapter:", quick_adapter(args, recipe, splits, program, adapter), flush=True)
        else:
            print(f"adapter: {adapter} (given)", flush=True)

        naive_lm = dspy.LM(
            "local/naive",
            engine=NaiveEngine(resolve_checkpoint(spec.path), adapter),
            max_tokens=spec.max_tokens,
            temperature=0.0,
            cache=False,
        )
        naive = measure("naive (generate per call, fp32)", naive_lm, program, metric, devset, args.threads)

        rates = {}
        variants = [("auto", "jointopt (defaults)")] + ([] if args.no_fp32 else [("float32", "jointopt fp32")])
        for dtype, label in variants:
            base = build_lm("small", spec.model_copy(update={"dtype": dtype}), cache=False)
            engine = base.engine
            engine.add_adapter("bench", adapter)
            lm = base.copy(model=adapter_model_id(base.model, "bench"))
            rates[dtype] = measure(
                f"{label}, {str(engine.dtype)[6:]}", lm, program, metric, devset, args.threads, engine
            )
            s = engine.decoder.stats
            print(
                f"    {s['batches']} batches, {s['rows'] / max(1, s['batches']):.1f} rows each; prompt tokens "
                f"{s['prompt_tokens']}, run {s['prefill_tokens']} ({100 * s['prefill_tokens'] / max(1, s['prompt_tokens']):.0f}%, "
                f"pads included); output tokens {s['output_tokens']}",
                flush=True,
            )
            engine.close()
    if "float32" in rates:
        print(f"jointopt fp32 / naive: {rates['float32'] / naive:.2f}x")
    from jointcli.weights.device import cpu_kind, resolve_dtype

    print(
        f"eval_throughput: {rates['auto'] / naive:.2f}x (target 4x) "
        f"[cpu {cpu_kind()}; jointopt {str(resolve_dtype('auto', 'cpu'))[6:]} vs naive float32]"
    )


if __name__ == "__main__":
    main()
