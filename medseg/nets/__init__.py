"""medseg.nets: segmentation networks and their registry.

- :mod:`~medseg.nets.registry`: :func:`register_network`, :class:`NetworkSpec` (what a bundle
  records), :func:`network_names`, :func:`get_network`.
- :mod:`~medseg.nets.unetpp`: UNet++ (``"unetpp"``), :func:`build_unetpp`, :func:`prune_unetpp`.
- :mod:`~medseg.nets.unet`: plain U-Net (``"unet"``), :func:`build_unet`.
- :mod:`~medseg.nets.prior`: :func:`prior_logits`, :func:`set_output_bias` (heads started at
  the class priors).

Names load on first use (PEP 562), so importing this package, or its registry for the network
names of a command line, does not import Keras.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_unetpp": "unetpp",
    "prune_unetpp": "unetpp",
    "check_input_shape": "unetpp",
    "nearest_valid_sizes": "unetpp",
    "head_names": "unetpp",
    "head_levels": "unetpp",
    "deep_supervision_weights": "unetpp",
    "repeat_targets": "unetpp",
    "build_unet": "unet",
    "prior_logits": "prior",
    "set_output_bias": "prior",
    "Network": "registry",
    "NetworkSpec": "registry",
    "get_network": "registry",
    "network_names": "registry",
    "register_network": "registry",
}
_SUBMODULES = ("blocks", "prior", "registry", "unet", "unetpp")

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
