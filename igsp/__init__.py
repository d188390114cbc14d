"""igsp: the iGSP continual-learning trainer for open_clip CLIP models (on top of igsp_kernels)."""

__version__ = "0.1.0"
