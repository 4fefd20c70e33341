"""medseg.losses: per-sample, distribution-correct segmentation losses and hard-label metrics.

Usable in any Keras 3 ``compile``/``fit`` on their own::

    from medseg.losses import DiceCELoss, ForegroundDice, ForegroundFraction
    model.compile(optimizer="adam", loss=DiceCELoss(),
                  metrics=[ForegroundDice(), ForegroundFraction()])
"""

from medseg.losses.compound import DiceCELoss, balanced_class_weights, weighted_cross_entropy
from medseg.losses.dice import DiceLoss, FocalTverskyLoss, GeneralizedDiceLoss
from medseg.losses.metrics import (
    ForegroundDice,
    ForegroundFraction,
    LesionSliceDice,
    MeanClassDice,
    TrueForegroundFraction,
    dice_metrics,
)
from medseg.losses.regions import RegionDiceBCELoss
from medseg.losses.regularization import regularization_loss

__all__ = [
    "DiceLoss",
    "DiceCELoss",
    "GeneralizedDiceLoss",
    "FocalTverskyLoss",
    "weighted_cross_entropy",
    "balanced_class_weights",
    "ForegroundDice",
    "LesionSliceDice",
    "ForegroundFraction",
    "TrueForegroundFraction",
    "MeanClassDice",
    "dice_metrics",
    "RegionDiceBCELoss",
    "regularization_loss",
]
