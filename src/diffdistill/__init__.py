"""diffdistill: distill diffusion teachers into one-step and few-step students."""

__version__ = "0.1.0"
