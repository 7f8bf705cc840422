"""What a local model is on disk and in memory: its checkpoint (the embedded SmolLM2 or a folder), its
tokenizer's chat template, the device and dtype it runs in, and the adapters and soft prompts that
jointopt trains on top of it. Both inference/ and training/ build on this folder."""
