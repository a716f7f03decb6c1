"""The registry of the factored engine's layer handlers: one handler class per layer type (like Opacus).

`handler_for(module)` returns the first registered handler that `supports` the module; the engine sends the
modules no handler supports to the exact generic fallback."""

from __future__ import annotations

from torch import nn

from .base import LayerHandler

HANDLERS: list[type[LayerHandler]] = []


def register_layer(cls: type[LayerHandler]) -> type[LayerHandler]:
    """Class decorator: make a handler available to the factored engine (earlier registrations win)."""
    HANDLERS.append(cls)
    return cls


def handler_for(module: nn.Module) -> type[LayerHandler] | None:
    """The registered handler class for `module`, or None (then the exact generic fallback applies)."""
    for cls in HANDLERS:
        if cls.supports(module):
            return cls
    return None
