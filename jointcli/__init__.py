"""jointopt: jointly optimize the prompts and the weights of DSPy programs.

    jointopt eval recipes/sst2.yaml data.split.dev=20
    jointopt joint recipes/sst2.yaml
"""

__version__ = "0.1.0"
