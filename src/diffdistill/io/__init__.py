"""Model files: training checkpoints (atomic, with sha256 manifests), exported safetensors, NVlabs/edm pickles and
diffusers folders — read and written here, low in the import graph, so eval/, train/, distill and the CLI share one
loader."""

from .load import (convert_teacher, export_checkpoint, load_exported, load_for_sampling, load_model_file,
                   load_teacher)

__all__ = ["convert_teacher", "export_checkpoint", "load_exported", "load_for_sampling", "load_model_file",
           "load_teacher"]
