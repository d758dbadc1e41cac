"""diffdistill: distill diffusion teachers into one-step and few-step students.

The Python API (``diffdistill/api.py``): ``load_teacher``, ``distill``, ``sample``, ``evaluate``.
"""

__version__ = "0.1.0"

from .api import DistillRun, distill, evaluate, load_teacher, sample  # noqa: E402

__all__ = ["DistillRun", "distill", "evaluate", "load_teacher", "sample", "__version__"]
