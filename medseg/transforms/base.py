"""The base classes of a pipeline's steps (MONAI-style dictionary transforms).

- :class:`MapTransform` applies an array/volume function to the entries named by ``keys``; a
  missing key raises ``KeyError`` naming the key and the transform, unless
  ``allow_missing_keys=True``. The deterministic steps of a
  :class:`~medseg.transforms.pipeline.Pipeline`.
- :class:`Randomizable` transforms draw parameters from ``self.rng`` (set with
  ``set_random_state``); ``last_params`` records what was drawn. The random steps of a pipeline,
  run per batch by :func:`medseg.transforms.batch.run_random` with the batch's generator.

Steps are run in order by :class:`~medseg.transforms.pipeline.Pipeline` (``preprocess`` for the
deterministic ones: a failure gets a note naming the step and the case).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["MapTransform", "Randomizable", "Lambdad", "case_id_of", "init_args"]


def init_args(obj: Any) -> dict:
    """The ``__init__`` arguments of ``obj`` read back from its attributes of the same names.

    The default ``get_config`` of every transform: a transform that stores each argument under
    its own name needs no ``get_config`` of its own. Tuples become lists (JSON).

    Raises:
        TypeError: naming the argument, when ``obj`` keeps no attribute of that name (the class
            must then define ``get_config``).
    """
    import inspect

    args = {}
    for name, param in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(obj, name):
            raise TypeError(f"{type(obj).__name__}: argument {name!r} is not kept as an attribute of that name; "
                            f"define get_config() returning every __init__ argument")
        value = getattr(obj, name)
        args[name] = list(value) if isinstance(value, tuple) else value
    return args


def case_id_of(sample: Any) -> str:
    """The case id of a sample (from its first value that has one), else ``"<unknown case>"``."""
    if isinstance(sample, Mapping):
        if "case_id" in sample:
            return str(sample["case_id"])
        for value in sample.values():
            cid = getattr(value, "case_id", None)
            if cid:
                return str(cid)
    return "<unknown case>"


class MapTransform:
    """Base class of dictionary transforms.

    Subclasses implement :meth:`apply` (one value -> new value). ``__call__`` returns a new dict
    (the input sample is never modified).

    Args:
        keys: key or keys to transform.
        allow_missing_keys: skip absent keys instead of raising.

    Raises:
        ValueError: if ``keys`` is empty.
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], allow_missing_keys: bool = False):
        self.keys = (keys,) if isinstance(keys, (str, int)) or not isinstance(keys, Iterable) else tuple(keys)
        if not self.keys:
            raise ValueError(f"{type(self).__name__} needs at least one key, found {keys!r}")
        self.allow_missing_keys = bool(allow_missing_keys)

    def key_iterator(self, sample: Mapping) -> Iterable[Hashable]:
        for key in self.keys:
            if key in sample:
                yield key
            elif not self.allow_missing_keys:
                raise KeyError(f"{self!r}: sample has no key {key!r} (keys: {sorted(map(str, sample))}); "
                               f"pass allow_missing_keys=True to skip it")

    def apply(self, value: Any, key: Hashable) -> Any:
        return value

    def __call__(self, sample: Mapping) -> dict:
        out = dict(sample)
        for key in self.key_iterator(sample):
            out[key] = self.apply(sample[key], key)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={self.keys})"

    #: True when the transform changes each slice of a plan-space stack (or each voxel) on its
    #: own: inference may then preprocess long volumes chunk by chunk with the same result.
    slice_local: bool = False
    #: True when only training needs it (its output feeds the patch sampler, not the model).
    training_only: bool = False

    def get_config(self) -> dict:
        """The arguments that rebuild this transform (JSON-ready); see :func:`init_args`."""
        return init_args(self)


class Randomizable:
    """Mixin for random transforms: an explicit generator and the parameters last drawn."""

    rng: np.random.Generator
    last_params: dict | None = None

    def set_random_state(self, seed: int | None = None, rng: np.random.Generator | None = None) -> "Randomizable":
        """Use ``rng`` (or a new generator seeded with ``seed``) for all future draws."""
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        return self

    def randomize(self, sample: Mapping) -> dict:
        """Draw this call's parameters from ``self.rng``; subclasses override."""
        return {}

    def get_config(self) -> dict:
        """The arguments that rebuild this transform (JSON-ready); see :func:`init_args`."""
        return init_args(self)


class Lambdad(MapTransform):
    """Apply ``func(value)`` to each key (MONAI ``Lambdad``). Not serializable: a model's
    pipeline cannot hold one (write a registered :class:`MapTransform` instead)."""

    def __init__(self, keys, func: Callable[[Any], Any], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.func = func

    def apply(self, value, key):
        return self.func(value)

    def get_config(self) -> dict:
        raise TypeError("Lambdad holds a Python function and cannot be saved with a model; "
                        "write a MapTransform subclass and register it (docs/pipeline.md)")
