"""Training a local checkpoint in-process: the LoRA (and soft-prompt) trainer, its shared-prefix
micro-batches, the curriculum, and data-parallel training over several processes."""
