"""Layer handlers of the factored engine, one file per layer type, found through a registry (like Opacus).

`handler_for(module)` returns the first registered handler that `supports` the module; modules that own
trainable parameters and that no handler supports go to `GenericHandler` (exact per-sample gradients by
`torch.func`, i.e. the reference path), which the engine names in its log.

To add a layer type: subclass `LayerHandler` (usually `DeferredHandler`, whose patched forward runs an
autograd Function, or `TappedHandler`, which keeps the module's own forward) in a new file, decorate it with
`@register_layer`, import the file below. A handler's layer hands it what its backward saw through
`record.record(tensors, handler.key, copy)` → `handler.receive(tensors)` (see `record.py`: that path works
under torch.compile without graph breaks); `collect` and `accumulate` then work per sample through the
micro-batch's `SampleLayout`.
"""

from __future__ import annotations

from torch import nn

from .base import LayerHandler, SketchSink, WeightSlot

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


from . import linear, embedding, norm  # noqa: E402,F401  (register the handlers)
from .generic import GenericHandler  # noqa: E402

__all__ = ["HANDLERS", "GenericHandler", "LayerHandler", "SketchSink", "WeightSlot", "handler_for", "register_layer"]
