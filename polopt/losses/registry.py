"""Registry of losses by name: `register_loss`, `get_loss`, `list_losses`, `loss_hparams`."""

from __future__ import annotations

from typing import Callable, TypeVar

from polopt.losses.base import PolicyLoss, hparam_names

_REGISTRY: dict[str, type[PolicyLoss]] = {}

LossClass = TypeVar("LossClass", bound=type[PolicyLoss])


def register_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator: `@register_loss("nft") class NFTLoss(PolicyLoss): ...`."""

    def register(cls: LossClass) -> LossClass:
        if not (isinstance(cls, type) and issubclass(cls, PolicyLoss)):
            raise TypeError(f"register_loss({name!r}) needs a PolicyLoss subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"loss {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def list_losses(registration_order: bool = False) -> list[str]:
    """Names of the registered losses, sorted (or in the order they were registered)."""
    return list(_REGISTRY) if registration_order else sorted(_REGISTRY)


def loss_hparams(name: str) -> list[str]:
    """The hyperparameter names the loss registered as `name` accepts (its constructor's)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(list_losses())}")
    return hparam_names(_REGISTRY[name])


def get_loss(name: str, **hparams) -> PolicyLoss:
    """An instance of the loss registered as `name`, built with `hparams` (checked at construction)."""
    accepted = loss_hparams(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(f"loss {name!r} got unknown hyperparameter(s) {unknown}; accepted: {', '.join(accepted)}")
    return _REGISTRY[name](**hparams)
