"""Transforms by name: what lets a model's pipeline be written to JSON and read back.

A pipeline entry is ``{"name": registered name, "module": defining module, "args": {...}}``.
Reading it imports ``module`` when the name is not registered yet, so a user's own transform,
registered with :func:`register_transform` in their module, comes back with the model as long as
that module is importable (installed, or on ``PYTHONPATH``).

Example:
    >>> @register_transform
    ... class Squared(MapTransform):
    ...     def apply(self, value, key):
    ...         return value.with_array(value.array ** 2)
    >>> entry = transform_config(Squared("image"))
    >>> transform_from_config(entry)
    Squared(keys=('image',))
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Mapping

__all__ = ["register_transform", "registered_transforms", "transform_config", "transform_from_config"]

_REGISTRY: dict[str, type] = {}


def register_transform(cls: type | None = None, *, name: str | None = None):
    """Class decorator: make a transform class known by ``name`` (default: the class name).

    Re-registering the same class (a module imported twice) is allowed; another class under a
    taken name raises ``ValueError`` naming both.
    """

    def register(c: type) -> type:
        key = name or c.__name__
        taken = _REGISTRY.get(key)
        if taken is not None and (taken.__module__, taken.__qualname__) != (c.__module__, c.__qualname__):
            raise ValueError(f"transform name {key!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                             f"register {c.__module__}.{c.__qualname__} under another name")
        _REGISTRY[key] = c
        c.registered_name = key
        return c

    return register(cls) if cls is not None else register


def registered_transforms() -> dict[str, type]:
    """Name -> class of every registered transform so far (the built-ins once
    :mod:`medseg.transforms.dictionary` is imported, as :mod:`medseg.transforms.pipeline` does).

    This module imports no transform: it is the leaf the transform modules register with.
    """
    return dict(_REGISTRY)


def transform_config(transform: Any) -> dict:
    """``{"name", "module", "args"}`` of a registered transform.

    Raises:
        TypeError: the class is not registered, or its arguments are not JSON-serializable.
    """
    cls = type(transform)
    name = getattr(cls, "registered_name", None)
    if name is None or _REGISTRY.get(name) is not cls:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a registered transform; "
                        f"decorate the class with @medseg.transforms.register_transform")
    args = transform.get_config()
    try:
        args = json.loads(json.dumps(args))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}.get_config() must return JSON-serializable values: {exc}") from exc
    return {"name": name, "module": cls.__module__, "args": args}


def transform_from_config(entry: Mapping[str, Any]) -> Any:
    """The transform an entry of :func:`transform_config` describes.

    A name not registered yet is looked up by importing the entry's ``module`` (the built-ins'
    is ``medseg.transforms.dictionary``).

    Raises:
        ValueError: the entry is malformed, the name is unknown (its module cannot be imported or
            does not register it), or the arguments do not fit the class.
    """
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ValueError(f"a transform entry is a mapping with a 'name', found {entry!r}")
    name, module, args = entry["name"], entry.get("module"), entry.get("args") or {}
    if not isinstance(args, Mapping):
        raise ValueError(f"transform {name!r}: 'args' must be a mapping, found {type(args).__name__}")
    if name not in _REGISTRY and module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"transform {name!r} is defined in module {module!r}, which cannot be imported "
                             f"({exc}); install it or put its folder on PYTHONPATH") from exc
    cls = _REGISTRY.get(name)
    if cls is None:
        where = f" (module {module!r} was imported but does not register it)" if module else ""
        raise ValueError(f"unknown transform {name!r}{where}; registered: {', '.join(sorted(_REGISTRY))}")
    try:
        return cls(**dict(args))
    except TypeError as exc:
        raise ValueError(f"transform {name!r}: arguments {dict(args)} do not fit: {exc}") from exc
