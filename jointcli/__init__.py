"""jointopt: jointly optimize the prompts and the weights of DSPy programs.

    jointopt eval recipes/sst2.yaml data.split.dev=20
    jointopt joint recipes/sst2.yaml
"""

import os

# OpenMP threads that spin while waiting make generation several times slower whenever another
# process shares the cores (measured here: 0.7-6 tok/s against 17-20); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Models come from packages and local folders: never reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
