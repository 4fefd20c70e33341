"""Registry of segmentation networks: a run names its network, inference asks the registry.

A network is a :class:`Network` subclass registered under a short name with
:func:`register_network`. It holds the builder and declares what the built model provides: the
size multiple it needs, its outputs in order, the one used at inference, the deep-supervision
loss weights, and how to cut the model down to one output. A :class:`NetworkSpec` (name +
architecture arguments, as nnU-Net's ``network_arch_class_name`` + ``arch_kwargs``) is what
``bundle.json`` records::

    "network": {"name": "unetpp", "args": {"filters": [32, 64, 128, 256, 512], "depth": 4,
                                           "deep_supervision": true, "batch_norm": true, ...}}

Training builds through the spec, inference reads the outputs through it (``model.output_names``
and the declaration, never layer names), so adding an architecture touches neither.

Importing this module does not import Keras: :func:`network_names` serves command-line choices.
The built-in networks are imported on first use; a network defined elsewhere registers when its
module is imported, which must happen before a bundle naming it is loaded.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

__all__ = [
    "Network",
    "NetworkSpec",
    "get_network",
    "load_networks",
    "network_names",
    "recognize_network",
    "register_network",
    "select_output",
]

#: Built-in networks: name -> module registering it (imported on first use, so that the names are
#: known without importing Keras).
BUILTIN: dict[str, str] = {"unetpp": "medseg.nets.unetpp", "unet": "medseg.nets.unet"}
_REGISTRY: dict[str, type["Network"]] = {}
#: Class attributes a registered network must define (the base class has none of them).
_REQUIRED = ("builder", "title", "divisor", "output_names")


class Network:
    """An architecture: its builder and what the models it builds provide.

    Subclasses set ``builder`` (``builder(input_channels, num_classes, **args) -> keras.Model``;
    its keyword defaults are the architecture's arguments), ``title`` (name in messages), and
    the class methods ``divisor(args)`` and ``output_names(args)``; they may override the others.
    ``args`` is always complete (:meth:`complete`). Never instantiated: the class is the entry.
    """

    name: ClassVar[str] = ""
    #: Builder arguments that shape a run, not the architecture (not recorded in a spec).
    runtime_args: ClassVar[tuple[str, ...]] = ("input_shape_hw", "name", "sync_batch_norm", "head_activation", "dtype",
                                               "seed")

    @classmethod
    def arg_defaults(cls) -> dict[str, Any]:
        """The architecture's arguments and their defaults, from the builder's signature."""
        params = inspect.signature(cls.builder).parameters.values()
        skip = {"input_channels", "num_classes", *cls.runtime_args}
        return {p.name: p.default for p in params
                if p.name not in skip and p.default is not inspect.Parameter.empty}

    @classmethod
    def complete(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """``args`` over the defaults; subclasses also check values (raising ``ValueError``)."""
        return {**cls.arg_defaults(), **args}

    @classmethod
    def final_output(cls, args: Mapping[str, Any]) -> str:
        """Name of the output used at inference: the last one."""
        return cls.output_names(args)[-1]

    @classmethod
    def loss_weights(cls, args: Mapping[str, Any]) -> list[float]:
        """Training loss weight of each output, in output order, summing to 1: equal."""
        n = len(cls.output_names(args))
        return [1.0 / n] * n

    @classmethod
    def inference_model(cls, model: "keras.Model", args: Mapping[str, Any], head: int | None = None) -> "keras.Model":
        """The single-output model to run: the final output (shared layers, same weights).

        Raises:
            ValueError: ``head`` is given (this network has no heads to choose from), or the
                model lacks the final output.
        """
        if head is not None:
            raise ValueError(f"a {cls.title} has no deep-supervision heads to choose from "
                             f"(outputs {cls.output_names(args)}), head {head} was asked for")
        return select_output(model, cls.final_output(args))

    @classmethod
    def describe_head(cls, args: Mapping[str, Any], head: int | None) -> str:
        """What a model must have for :meth:`inference_model` with ``head``, for messages."""
        if head is None:
            return f"a {cls.title} with output {cls.final_output(args)!r}"
        return f"a {cls.title} with head {head}"

    @classmethod
    def legacy_args(cls, model: "keras.Model") -> dict[str, Any] | None:
        """The arguments ``model`` was built with, if this network built it, else None.

        Only for bundles written before ``bundle.json`` named its network; a network that never
        had such bundles keeps this default (None).
        """
        return None


def register_network(name: str) -> Callable[[type[Network]], type[Network]]:
    """Class decorator registering a :class:`Network` subclass under ``name``.

    Raises:
        ValueError: ``name`` is not a lower-case identifier or is taken by another class.
        TypeError: the class is not a :class:`Network` or lacks one of ``builder``, ``title``,
            ``divisor``, ``output_names``.
    """
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
        raise ValueError(f"network names are lower-case identifiers, found {name!r}")

    def decorate(cls: type[Network]) -> type[Network]:
        if not (isinstance(cls, type) and issubclass(cls, Network)):
            raise TypeError(f"register_network({name!r}) decorates a Network subclass, found {cls!r}")
        missing = [a for a in _REQUIRED if getattr(cls, a, None) is None]
        if missing:
            raise TypeError(f"network {name!r} ({cls.__name__}) must define {', '.join(missing)}")
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"network name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def network_names() -> list[str]:
    """Names of the registered and built-in networks, sorted (no Keras import)."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get_network(name: str) -> type[Network]:
    """The registered network ``name`` (importing its built-in module on first use).

    Raises:
        ValueError: unknown name, listing the registered ones.
    """
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown network {name!r}; registered networks: {', '.join(network_names())}") from None


def load_networks() -> None:
    """Import every built-in network module (registers any Keras classes they define)."""
    for name in BUILTIN:
        get_network(name)


def select_output(model: "keras.Model", output: str) -> "keras.Model":
    """``model`` reduced to its output named ``output`` (``model.output_names``); the model itself
    when that is its only output. The reduced model shares the layers, hence the weights.

    Raises:
        ValueError: ``model`` has no such output.
    """
    import keras

    names = list(model.output_names)
    if output not in names:
        raise ValueError(f"model {model.name!r} has no output {output!r}; its outputs: {names}")
    if len(names) == 1:
        return model
    index = names.index(output)
    return keras.Model(inputs=model.inputs, outputs=model.outputs[index], name=f"{model.name}_{output}")


def recognize_network(model: "keras.Model") -> "NetworkSpec | None":
    """Legacy fallback: the spec of a model saved without one, from the first network whose
    :meth:`Network.legacy_args` recognizes it; None for a model no network built."""
    load_networks()
    for name in network_names():
        args = get_network(name).legacy_args(model)
        if args is not None:
            return NetworkSpec(name, args)
    return None


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, repr=False)
class NetworkSpec:
    """A registered network and its architecture arguments: what a bundle records.

    ``args`` is completed with the builder's defaults and checked on construction, and frozen
    (JSON values; lists become tuples). Equal specs build the same architecture.

    Raises:
        ValueError: unknown network name (listing the registered ones), an argument the network
            does not take, a bad value, or a value that is not JSON.

    Example:
        >>> spec = NetworkSpec("unet", {"filters": [8, 16, 32], "depth": 2})   # doctest: +SKIP
        >>> model = spec.build(input_channels=3, num_classes=2)                  # doctest: +SKIP
        >>> spec.divisor, spec.output_names                                       # doctest: +SKIP
        (4, ['head'])
    """

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        network = get_network(self.name)
        if not isinstance(self.args, Mapping):
            raise ValueError(f"network {self.name!r}: args must be a mapping, found {type(self.args).__name__}")
        accepted = network.arg_defaults()
        unknown = sorted(set(self.args) - set(accepted))
        if unknown:
            raise ValueError(f"network {self.name!r} takes no argument(s) {', '.join(unknown)}; "
                             f"its arguments: {', '.join(accepted)}")
        full = network.complete(_thaw(dict(self.args)))
        try:
            plain = json.loads(json.dumps(full, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"network {self.name!r}: args must be JSON values ({exc})") from exc
        object.__setattr__(self, "args", _freeze(plain))

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, name: str, **settings: Any) -> "NetworkSpec":
        """The spec of network ``name`` from general settings, keeping those it takes (a plain
        U-Net has no use for ``deep_supervision``)."""
        accepted = get_network(name).arg_defaults()
        return cls(name, {k: v for k, v in settings.items() if k in accepted})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NetworkSpec":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not ``{"name": str, "args": {...}}``, or the spec is invalid.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("args", {}), Mapping) or set(data) - {"name", "args", "module"}:
            raise ValueError(f'a network is {{"name": str, "args": {{...}}}}, found {data!r}')
        module = data.get("module")
        if module and data["name"] not in network_names():
            # A user's network (registered in their own module): import it, as for transforms.
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ValueError(f"network {data['name']!r} is defined in module {module!r}, which cannot be "
                                 f"imported ({exc}); install it or put its folder on PYTHONPATH") from exc
        return cls(data["name"], dict(data.get("args", {})))

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "args": {...}}``, JSON-serializable; a network registered outside medseg
        also names its ``"module"``, which :meth:`from_dict` imports to find it again."""
        d = {"name": self.name, "args": _thaw(self.args)}
        module = self.network.__module__
        if module != BUILTIN.get(self.name):
            d["module"] = module
        return d

    # --- what the built model provides -------------------------------------------------------
    @property
    def network(self) -> type[Network]:
        return get_network(self.name)

    @property
    def title(self) -> str:
        return self.network.title

    @property
    def divisor(self) -> int:
        """Input height and width must be multiples of this (``2**depth`` for the U-Nets)."""
        return int(self.network.divisor(self.args))

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, in order (``model.output_names``)."""
        return list(self.network.output_names(self.args))

    @property
    def final_output(self) -> str:
        """The output used at inference."""
        return self.network.final_output(self.args)

    @property
    def loss_weights(self) -> list[float]:
        """Training loss weight per output (deep supervision), in output order."""
        return list(self.network.loss_weights(self.args))

    def build(self, input_channels: int, num_classes: int, **runtime: Any) -> "keras.Model":
        """Build the model; ``runtime`` takes the builder's run arguments (``sync_batch_norm``,
        ``input_shape_hw``, ``name``).

        Raises:
            ValueError: a ``runtime`` argument that is not one, bad channel or class counts, or a
                model whose outputs are not the declared ones.
        """
        network = self.network
        wrong = sorted(set(runtime) - set(network.runtime_args))
        if wrong:
            raise ValueError(f"network {self.name!r} takes no run argument(s) {', '.join(wrong)}; "
                             f"run arguments: {', '.join(network.runtime_args)}")
        model = network.builder(input_channels, num_classes, **dict(self.args), **runtime)
        self.check_model(model)
        return model

    def check_model(self, model: "keras.Model") -> None:
        """Raise ``ValueError`` unless ``model.output_names`` are the declared outputs."""
        if list(model.output_names) != self.output_names:
            raise ValueError(f"model {model.name!r} has outputs {list(model.output_names)}, but network "
                             f"{self.name!r} with these arguments declares {self.output_names}")

    def inference_model(self, model: "keras.Model", head: int | None = None) -> "keras.Model":
        """The single-output model to run: the final output, or deep-supervision head ``head``
        where the network has heads (a UNet++ is then pruned to it).

        Raises:
            ValueError: the network or ``model`` has no such head or output.
        """
        return self.network.inference_model(model, self.args, head)

    def describe_head(self, head: int | None = None) -> str:
        """What a model must have for :meth:`inference_model` with ``head`` (for messages)."""
        return self.network.describe_head(self.args, head)

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.to_dict()["args"], sort_keys=True)))

    def __repr__(self) -> str:
        return f"NetworkSpec({self.name!r}, {_thaw(self.args)!r})"
