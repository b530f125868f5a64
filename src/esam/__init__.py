"""esam: the ESAM training objective for query-based online 3-D instance segmentation."""

__version__ = "0.1.0"
