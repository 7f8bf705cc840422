"""jointopt: jointly optimize the prompts and the weights of DSPy programs.

    jointopt eval recipes/sst2.yaml data.split.dev=20
    jointopt joint recipes/sst2.yaml

Importing the package changes nothing in the process: the CLI's entry point (`cli.main`) sets the
process-wide defaults a command needs (OMP_WAIT_POLICY, an offline Hugging Face hub, ...:
weights.device.set_process_defaults) before any command imports torch.
"""

__version__ = "0.1.0"
