"""Training a local checkpoint in-process: the LoRA (and soft-prompt) trainer.

lora.train_lora is the entry: it takes the adapter folder's lock and runs loop.train_in_process, the
training of one process, or data_parallel.launch, which runs it in several (ranks.py). Below the loop:
rows.py (DSPy rows to tokens), model.py (the model and its optimizer), microbatch.py (the optimizer
steps and their micro-batches), curriculum.py (easy rows first), work.py (checkpoints and resuming);
job.py holds what a training is asked to do and what it gives back.
"""
