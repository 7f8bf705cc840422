"""Serving a local checkpoint to concurrent DSPy calls: the engine (engine.py, DSPy 3.4's engine
contract), its worker thread that gathers calls into batches (batch_decoder.py), the decoding of a
batch (generation.py), the attention masks a padded batch needs (attention.py), the shared-prefix
key/value cache (prefix_cache.py), and the rules of local model ids (model_id.py). How much a batch
may hold is the recipe's models.<name>.limits (recipe/sections.py: EngineLimits)."""
