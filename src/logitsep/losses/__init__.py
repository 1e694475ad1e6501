"""Every loss of the project, one module per family, all in one registry.

>>> from logitsep.losses import LOSSES, get_loss
>>> loss_fn = get_loss("batch_ce")
>>> loss_fn.pols_aligned
True
>>> loss_spec("batch_ce").global_batch  # what else logitsep knows of a loss: one LossSpec each
True

Families: ``softmax`` (ce, self_norm, decoupled_softmax), ``margin`` (max_margin), ``binary`` (bce, nce),
``batch`` (batch_ce, batch_max_margin), ``spherical`` (z_loss), ``topk`` (smooth_topk_svm),
``cosine`` (cosface, arcface, elasticface, norm_softmax; these take cosines, see ``logitsep.heads.CosineHead``).
``sampled``: the sampled forms of bce, nce and batch_ce (features and head rows in, a candidate set of classes
scored: a step's cost does not grow with k; ``loss_spec(name).sampled``, :class:`SampledLoss`).
"""

from ..core.checks import value_checks, value_checks_enabled
from .batch import BatchCrossEntropyLoss, BatchMaxMarginLoss, batch_cross_entropy, batch_max_margin
from .binary import BinaryCrossEntropyLoss, NCELoss, binary_cross_entropy, nce
from .cosine import (
    ArcFaceLoss,
    CosFaceLoss,
    ElasticFaceLoss,
    NormSoftmaxLoss,
    arc_margin,
    arcface,
    cosface,
    elastic_margins,
    elasticface,
    norm_softmax,
)
from .margin import MaxMarginLoss, max_margin
from .registry import LOSS_SPECS, LOSSES, SAMPLED_FORMS, LossSpec, get_loss, loss_spec, register, register_sampled
from .sampled import (
    Candidates,
    SampledLoss,
    sample_candidates,
    sampled_batch_ce,
    sampled_bce,
    sampled_logits,
    sampled_nce,
)
from .softmax import (
    CrossEntropyLoss,
    DecoupledSoftmaxLoss,
    SelfNormalizationLoss,
    cross_entropy,
    decoupled_softmax,
    self_normalization,
)
from .spherical import ZLoss, z_loss, z_score
from .topk import SmoothTopkSVMLoss, smooth_topk_svm

__all__ = [
    "LOSSES",
    "LOSS_SPECS",
    "LossSpec",
    "SAMPLED_FORMS",
    "Candidates",
    "SampledLoss",
    "sample_candidates",
    "sampled_batch_ce",
    "sampled_bce",
    "sampled_logits",
    "sampled_nce",
    "register_sampled",
    "loss_spec",
    "ArcFaceLoss",
    "CosFaceLoss",
    "ElasticFaceLoss",
    "NormSoftmaxLoss",
    "arc_margin",
    "arcface",
    "cosface",
    "elastic_margins",
    "elasticface",
    "norm_softmax",
    "BatchCrossEntropyLoss",
    "BatchMaxMarginLoss",
    "BinaryCrossEntropyLoss",
    "CrossEntropyLoss",
    "DecoupledSoftmaxLoss",
    "MaxMarginLoss",
    "NCELoss",
    "SelfNormalizationLoss",
    "SmoothTopkSVMLoss",
    "ZLoss",
    "batch_cross_entropy",
    "batch_max_margin",
    "binary_cross_entropy",
    "cross_entropy",
    "decoupled_softmax",
    "get_loss",
    "max_margin",
    "nce",
    "register",
    "self_normalization",
    "smooth_topk_svm",
    "value_checks",
    "value_checks_enabled",
    "z_loss",
    "z_score",
]
