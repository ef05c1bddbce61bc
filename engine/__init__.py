"""xent: streaming fused cross-entropy (loss, gradient, metrics) over logit datasets."""

from engine.api import RowStats, cross_entropy, cross_entropy_grad, row_stats
from engine.options import LossOptions

__all__ = [
    "LossOptions",
    "RowStats",
    "cross_entropy",
    "cross_entropy_grad",
    "row_stats",
]

# evaluate / score / gradients live in the streaming layer (engine.stream); imported lazily
# so that `import engine` stays cheap for in-memory use.


def __getattr__(name):
    if name in ("evaluate", "score", "gradients", "Report"):
        from engine import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
