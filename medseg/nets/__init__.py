"""medseg.nets: the UNet++ segmentation network."""

from medseg.nets.unetpp import (
    build_unetpp,
    check_input_shape,
    deep_supervision_weights,
    head_levels,
    head_names,
    nearest_valid_sizes,
    prune_unetpp,
    repeat_targets,
)

__all__ = [
    "build_unetpp",
    "prune_unetpp",
    "check_input_shape",
    "nearest_valid_sizes",
    "head_names",
    "head_levels",
    "deep_supervision_weights",
    "repeat_targets",
]
