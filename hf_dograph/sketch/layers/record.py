"""How a handler receives what its layer's backward saw: one custom op, `hf_dograph::record`, called from the
backward of the handlers' autograd Functions.

Why an op and not a Python side effect: under `torch.compile`, dynamo traces autograd Functions (and tensor
hooks) as higher-order ops, and a backward that writes into a Python object outside them ("HOP: unsafe side
effect") splits the graph at every such layer — 20–30 graph breaks per step for a small GPT-2. A custom op
is opaque to the compiler: it is traced as one node, and its Python body runs at run time with the real
tensors. It is registered as *effectful* so that the compiler neither drops it (it returns nothing) nor
reorders it. Records are therefore made in the backward, holding the output gradient δ together with the
tensors saved in the forward: nothing has to be paired between forward and backward.

Compiled code may reuse the memory of any tensor it considers dead (inductor's buffer reuse, donated
buffers), and a reference held by the op does not keep it from doing so: when the recording Function was
traced by the compiler it passes `copy=True` and the op keeps copies. Eager code never reuses memory that
is referenced, so eager runs keep the tensors themselves (no copy), and skip the op's dispatch: they hand
the tensors to the handler directly.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_HANDLERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_recipient(handler) -> int:
    """A fresh key under which `handler.receive(tensors)` gets the records of its layer."""
    key = next(_KEYS)
    _HANDLERS[key] = handler
    return key


def _deliver(tensors: list[torch.Tensor], key: int, copy: bool) -> None:
    handler = _HANDLERS.get(key)
    if handler is None:  # the engine is gone (a graph kept alive past its engine)
        return
    handler.receive([t.clone() if copy else t for t in tensors])


@torch.library.custom_op("hf_dograph::record", mutates_args=())
def _record_op(tensors: list[torch.Tensor], key: int, copy: bool) -> None:
    _deliver(tensors, key, copy)


@_record_op.register_fake
def _(tensors, key, copy):
    return None


def _register_effect() -> bool:
    try:
        from torch._library.effects import EffectType

        _record_op.register_effect(EffectType.ORDERED)
        return True
    except (ImportError, AttributeError):  # older torch: no public way to keep an op without outputs
        return False


COMPILE_SAFE = _register_effect()


def record(tensors: list[torch.Tensor], key: int, copy: bool) -> None:
    """Hand `tensors` (detached) to the handler registered under `key` (from a backward)."""
    if not copy and not torch.compiler.is_compiling():
        # Eager: the op would only add its dispatch (~60 µs a call on CPU, once per layer per micro-batch) to
        # what its body does anyway.
        _deliver([t.detach() for t in tensors], key, copy)
        return
    torch.ops.hf_dograph.record([t.detach() for t in tensors], key, copy)


def compiling() -> bool:
    """Whether the calling code is being traced by torch.compile (then records are copies: see above)."""
    if not torch.compiler.is_compiling():
        return False
    if not COMPILE_SAFE:
        raise RuntimeError(
            "grad_engine='factored' under torch.compile needs a torch whose custom ops can be marked effectful "
            f"(torch {torch.__version__} cannot): upgrade torch, or train without torch_compile."
        )
    return True
