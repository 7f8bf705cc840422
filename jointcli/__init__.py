"""jointopt: jointly optimize the prompts and the weights of DSPy programs.

    jointopt eval recipes/sst2.yaml data.split.dev=20
    jointopt joint recipes/sst2.yaml

Importing the package changes nothing in the process; the CLI entry point (`cli.main`) sets the
few process-wide defaults it needs (models.device.set_process_defaults).
"""

__version__ = "0.1.0"
