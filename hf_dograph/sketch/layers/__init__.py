"""Layer handlers of the factored engine, one file per layer type, found through a registry (like Opacus).

`handler_for(module)` returns the first registered handler that `supports` the module; modules that own
trainable parameters and that no handler supports go to `GenericHandler` (exact per-sample gradients by
`torch.func`, i.e. the reference path), which the engine names in its log.

To add a layer type: subclass `LayerHandler` (usually `DeferredHandler`, whose patched forward runs an
autograd Function, or `TappedHandler`, which keeps the module's own forward) in a new file, decorate it with
`@register_layer` (from `registry.py`), import the file below. A handler's layer hands it what its backward saw through
`record.record(tensors, handler.key, copy)` → `handler.receive(tensors)` (see `record.py`: that path works
under torch.compile without graph breaks); `collect` and `accumulate` then work per sample through the
micro-batch's `SampleLayout`.
"""

from __future__ import annotations

from . import linear, embedding, norm  # noqa: F401,I001  (each registers its handler; earlier ones win)
from .base import LayerHandler, SketchSink, WeightSlot
from .generic import GenericHandler
from .registry import HANDLERS, handler_for, register_layer

__all__ = ["HANDLERS", "GenericHandler", "LayerHandler", "SketchSink", "WeightSlot", "handler_for", "register_layer"]
