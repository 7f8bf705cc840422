"""Serving a local checkpoint to concurrent DSPy calls: the engine (DSPy 3.4's engine contract),
its batch decoder, the shared-prefix key/value cache, and the `@adapter` rule of local model ids."""
