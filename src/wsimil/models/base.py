"""The aggregator contract shared by every MIL model, and the model registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MILOutput:
    """What every aggregator returns.

    Attributes:
        logits: ``(B, C)`` bag logits.
        bag_embedding: ``(B, E)`` bag representation before the classifier.
        attention_logits: raw (pre-softmax) attention, ``(B, N)`` or ``(B, H, N)`` for ``H`` heads/branches;
            ``None`` for models without attention. Padded positions hold ``-inf``.
        instance_logits: ``(B, N, C)`` per-instance class logits, or ``None``.
        extra_logits: further named bag-level predictions ``{head: (B, C_head)}`` that are evaluated beside
            ``logits`` (WENO's teacher head, HMIL's coarse level), or ``None``.
    """

    logits: Tensor
    bag_embedding: Tensor
    attention_logits: Tensor | None = None
    instance_logits: Tensor | None = None
    extra_logits: dict[str, Tensor] | None = None

    def detach(self) -> MILOutput:
        return MILOutput(**{f.name: _detach(getattr(self, f.name)) for f in fields(self)})


def _detach(t):
    if t is None:
        return None
    if isinstance(t, dict):
        return {k: v.detach() for k, v in t.items()}
    return t.detach()


class MILModel(nn.Module):
    """Base class: ``forward(x (B,N,D), mask (B,N) bool | None) -> MILOutput``.

    ``mask[b, i]`` is True for real instances and False for padding. ``aux_losses`` returns the model's own
    training terms beyond bag cross-entropy (e.g. CLAM's instance clustering), with ``loss_weights`` naming how
    the supervised method mixes them with the bag loss.
    """

    #: weights of the bag loss and of each auxiliary term; the bag term is always called "bag".
    loss_weights: dict[str, float] = {"bag": 1.0}
    #: True if the output does not depend on the order of instances within a bag.
    permutation_invariant: bool = True
    #: which output scores instances for instance AUC and heatmaps: "attention" or "instance" (logits)
    instance_score: str = "attention"

    #: dotted name of the ``nn.Linear`` that is the only reader of the raw features ``x``, or None
    input_layer: str | None = None

    def aux_losses(self, out: MILOutput, y: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {}

    def input_linear(self) -> nn.Linear | None:
        """The ``Linear`` named by ``input_layer`` (None when unset or absent, e.g. an empty projection). A feature
        standardisation can be folded into its weights (:func:`wsimil.data.batching.folded_standardizer`)
        instead of costing a pass over every bag."""
        if self.input_layer is None:
            return None
        try:
            layer = self.get_submodule(self.input_layer)
        except AttributeError:
            return None
        return layer if isinstance(layer, nn.Linear) else None


_REGISTRY: dict[str, Callable[..., MILModel]] = {}


_OPTIONS_OF: dict[str, Callable] = {}


def register_model(
    name: str, options_of: Callable | None = None
) -> Callable[[Callable[..., MILModel]], Callable[..., MILModel]]:
    """Register a factory ``fn(in_dim, n_classes, **options)``; ``options_of`` names the class whose constructor
    defines the options when the factory forwards ``**kw`` (so configs can tell which options a model takes)."""

    def deco(fn: Callable[..., MILModel]) -> Callable[..., MILModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        _OPTIONS_OF[name] = options_of or fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_options(name: str) -> set[str] | None:
    """Keyword options the constructor of model ``name`` accepts (``None`` when it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(_OPTIONS_OF[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name not in ("self", "in_dim", "n_classes")}


def create_model(name: str, in_dim: int, n_classes: int, **kwargs) -> MILModel:
    """Build a registered aggregator by name, e.g. ``create_model("abmil", 1024, 2, dropout=0.1)``."""
    from wsimil.errors import WsimilError

    if name not in _REGISTRY:
        raise WsimilError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as e:
        raise WsimilError(f"bad options for model {name!r}: {e}") from e


def full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """Return ``mask`` or an all-True ``(B, N)`` mask for ``x (B, N, D)``."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(torch.bool)
