"""xent: streaming fused cross-entropy (loss, gradient, metrics) over logit datasets."""

from engine.api import RowStats, cross_entropy, cross_entropy_grad, row_stats, topk_logprobs
from engine.options import LossOptions

__all__ = [
    "LossOptions",
    "RowStats",
    "cross_entropy",
    "cross_entropy_grad",
    "row_stats",
    "topk_logprobs",
]

# evaluate / score / gradients / compare (the dataset jobs, engine.jobs) are imported on first use,
# so that `import engine` stays cheap for in-memory use.


def __getattr__(name):
    if name in ("evaluate", "score", "gradients", "compare", "Report"):
        from engine import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
