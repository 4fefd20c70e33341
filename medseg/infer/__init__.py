"""medseg.infer: model bundles and whole-volume inference.

- :func:`save_bundle` / :func:`load_bundle`: a run folder with ``model.keras`` + ``bundle.json``;
  :class:`BundleInfo` is the typed ``bundle.json`` (:mod:`medseg.infer.contract`).
- :class:`Predictor`: the bundle's preprocessing + model + restore onto the input's grid.
- :func:`remove_small_lesions`, :func:`keep_largest_component`: post-processing of label maps.

Importing this package does not import TensorFlow or Keras (they load on first use).
"""

from medseg.infer.bundle import Bundle, load_bundle, read_bundle_contract, read_bundle_info, save_bundle
from medseg.infer.contract import BundleInfo, ComponentChoice, Postprocessing, TrainingRecord
from medseg.infer.postprocess import keep_largest_component, remove_small_lesions
from medseg.infer.predictor import Predictor

__all__ = [
    "Bundle",
    "BundleInfo",
    "ComponentChoice",
    "Postprocessing",
    "Predictor",
    "TrainingRecord",
    "keep_largest_component",
    "load_bundle",
    "read_bundle_contract",
    "read_bundle_info",
    "remove_small_lesions",
    "save_bundle",
]
