"""Pieces the multi-process test workers (ddp_worker.py, fsdp_worker.py) share."""

from __future__ import annotations


def record_domain_weights(trainer) -> list[list[float]]:
    """Make `trainer` append, after every micro-batch, the domain weights in use (the same on every rank) to the
    returned list, once the domains exist."""
    weights: list[list[float]] = []
    original = trainer._record

    def record(*args):
        original(*args)
        w = trainer.dograph_last.domain_weights
        if w is not None:
            weights.append(w.tolist())

    trainer._record = record
    return weights
