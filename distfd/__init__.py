"""distfd: FasterDiffusion encoder propagation and parallel decoding across GPUs."""

__version__ = "0.1.0"
