"""Which tokens of a batch make up which sample: rows (the usual case) or packed segments.

DoGraph weights *samples*. Usually sample i is row i of the (B, T) batch. With padding-free packing
(`transformers.DataCollatorWithFlattening`: one row holding several sequences, `position_ids` restarting at
0 for each) a sample is a contiguous run of tokens — a *segment* — and one row holds several of them::

    layout = SampleLayout.rows(8)                                   # sample i = row i
    layout = SampleLayout.segments(segment_ids)                     # (B, T): sample id per token, -1: none
    layout = SampleLayout.from_position_ids(position_ids)           # DataCollatorWithFlattening's batches

    engine.backward(losses, layout)      # losses: (layout.num_samples,), one per sample

Per-sample gradients of a segment are exact when every token's activations influence only its own
segment's loss, i.e. when attention does not cross segments (HF models do that for packed batches from
`position_ids`); tokens with id -1 must not influence any loss (padding).

The helpers below are what the factored engine's layer handlers need to turn token-level tensors
(B, T, F) into per-sample quantities (S, …) and per-sample coefficients back into token-level ones. For
a rows layout they are the plain batch operations (no copies).
"""

from __future__ import annotations

import torch

from ..tensors import as_dtype


class SampleLayout:
    """The map from tokens of a (B, T) batch to samples 0..S-1 (see the module docstring).

    Build one with `rows`, `segments` or `from_position_ids`; the constructor is internal.

    Attributes:
        num_samples: S, the number of samples (rows of `sketches()`, length of α).
        batch_size: B, the number of rows of the batch.
        seq_len: T for a segment layout (every token tensor must be (B, T, …)); None for rows.
        segment_ids: (B, T) long tensor of sample ids (-1: no sample) for a segment layout; None for rows.
    """

    def __init__(self, *, num_samples: int, batch_size: int, segment_ids: torch.Tensor | None = None,
                 _checked: bool = False):
        if not _checked:
            raise TypeError("build a SampleLayout with SampleLayout.rows(...), .segments(...) or "
                            ".from_position_ids(...)")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.segment_ids = segment_ids
        self.seq_len = None if segment_ids is None else int(segment_ids.shape[1])
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def rows(cls, batch_size: int) -> SampleLayout:
        """Sample i is row i of the batch (B samples)."""
        if int(batch_size) < 1:
            raise ValueError(f"a rows layout needs batch_size >= 1, got {batch_size}")
        return cls(num_samples=batch_size, batch_size=batch_size, _checked=True)

    @classmethod
    def segments(cls, segment_ids: torch.Tensor) -> SampleLayout:
        """Sample s is the tokens whose id is s (ids 0..S-1, each one contiguous run inside one row; -1: a token
        of no sample, e.g. padding)."""
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
            raise ValueError("segment_ids must be a (B, T) tensor of sample ids (-1 for tokens of no sample), got "
                             f"{type(segment_ids).__name__} of shape {tuple(getattr(segment_ids, 'shape', ()))}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool or segment_ids.is_complex():
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        seg = segment_ids.long()
        b, t = seg.shape
        if bool((seg < -1).any()):
            raise ValueError("segment_ids: ids must be >= 0, or -1 for tokens that belong to no sample")
        s = int(seg.max()) + 1 if seg.numel() else 0
        if s < 1:
            raise ValueError("segment_ids: no token belongs to a sample (all -1)")
        # A run starts at a row's first token or where the id changes; each id must start exactly once:
        # that is "present" and "one contiguous run inside one row" at once.
        prev = torch.cat([torch.full((b, 1), -2, dtype=seg.dtype, device=seg.device), seg[:, :-1]], dim=1)
        starts = (seg >= 0) & (seg != prev)
        runs = torch.bincount(seg[starts], minlength=s)
        if bool((runs != 1).any()):
            missing = (runs == 0).nonzero().flatten()[:5].tolist()
            split = (runs > 1).nonzero().flatten()[:5].tolist()
            raise ValueError(
                "segment_ids: every sample id 0..S-1 must label one contiguous run of tokens inside one row"
                + (f"; ids with no token: {missing}" if missing else "")
                + (f"; ids split into several runs: {split}" if split else "")
            )
        return cls(num_samples=s, batch_size=b, segment_ids=seg, _checked=True)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SampleLayout:
        """Segments of a packed batch: a new sample starts wherever `position_ids` is 0 (and at every row's first
        token), as `DataCollatorWithFlattening` lays sequences out. Tokens where `attention_mask` is 0 belong to
        no sample."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
            raise ValueError("position_ids must be a (B, T) tensor (pass it expanded to the batch), got shape "
                             f"{tuple(getattr(position_ids, 'shape', ()))}")
        pos = position_ids.long()
        valid = torch.ones_like(pos, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # a sample starts at position 0 and at each row's first valid token (a row never continues the previous one)
        start = valid & ((pos == 0) | (torch.cumsum(valid.long(), dim=1) == 1))
        ids = torch.cumsum(start.flatten().long(), 0).view_as(pos) - 1
        return cls.segments(torch.where(valid & (ids >= 0), ids, torch.full_like(ids, -1)))

    # ------------------------------------------------------------------ description
    @property
    def is_rows(self) -> bool:
        return self.segment_ids is None

    def __repr__(self) -> str:
        if self.is_rows:
            return f"SampleLayout.rows({self.batch_size})"
        return f"SampleLayout.segments(B={self.batch_size}, T={self.seq_len}, S={self.num_samples})"

    def lengths(self) -> torch.Tensor:
        """(S,) the number of tokens of each sample (segment layouts only)."""
        if self.is_rows:
            raise ValueError("a rows layout does not know its token count")
        return self._index()[2]

    # ------------------------------------------------------------------ token tensors
    def token_view(self, x: torch.Tensor, features: int, what: str) -> torch.Tensor:
        """`x` (batch first, features last) as (B, tokens, features). For a segment layout the tokens must be the
        (B, T) of `segment_ids`."""
        b = self.batch_size
        if x.dim() < 2 or x.shape[0] != b:
            raise ValueError(f"{what}: expected a batch-first tensor with batch size {b}, got shape {tuple(x.shape)} "
                             "(pass position_ids expanded to (B, T))")
        if self.is_rows:
            if x.dim() == 3 and x.shape[2] == features:  # already (B, tokens, features)
                return x
            return x.reshape(b, -1, features)
        t = self.seq_len
        if x.shape[1] != t or x.numel() != b * t * features:
            raise ValueError(
                f"{what}: a tensor of shape {tuple(x.shape)} is not token-aligned with the packed batch (B, T) = "
                f"({b}, {t}): with packed sequences every sketched layer must work token by token on (B, T, …)"
            )
        return x.reshape(b, t, features)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, F) → (S, L, F): each sample's tokens, zero-padded to the longest sample (exact zeros there,
        whatever `x` holds at tokens of no sample). A rows layout returns `x` itself."""
        if self.is_rows:
            return x
        index, mask, _ = self._index(x.device)
        s, length = index.shape
        flat = x.reshape(-1, x.shape[-1])
        out = flat.index_select(0, index.flatten()).view(s, length, x.shape[-1])
        return out.masked_fill(~mask.unsqueeze(-1), 0)

    def padded_length(self) -> int:
        """L, the token count per sample of `padded` (the longest sample; a segment layout only)."""
        if self.is_rows:
            raise ValueError("a rows layout does not know its token count")
        return int(self._index()[0].shape[1])

    def sum_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, F) → (S, F): the sum over each sample's tokens (a fixed order: deterministic)."""
        if self.is_rows:
            return x.sum(dim=1)
        return self.padded(x).sum(dim=1)

    def scale_tokens(self, x: torch.Tensor, coef: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, tokens, …) with each token multiplied by its sample's coefficient coef (S,) (a new tensor).
        Tokens of samples in `drop` (S,) bool — and, for segments, tokens of no sample — are exact zeros
        (0 · NaN would be NaN)."""
        if self.is_rows:
            out = x * as_dtype(coef, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
            if drop is not None:  # a mask, not boolean indexing: no device→host read
                out.masked_fill_(drop.reshape(-1, *([1] * (x.dim() - 1))), 0)
            return out
        seg = self._segment_ids(x.device)
        c = coef.to(device=x.device, dtype=x.dtype)[seg.clamp(min=0)]
        c = c.reshape(*seg.shape, *([1] * (x.dim() - 2)))
        return torch.where(self._dropped_tokens(drop, x.device).reshape(c.shape), torch.zeros((), dtype=x.dtype,
                           device=x.device), x * c)

    def zero_tokens(self, x: torch.Tensor, drop: torch.Tensor | None, *, in_place: bool) -> torch.Tensor:
        """x (B, tokens, …) with the tokens of `drop` samples (and, for segments, of no sample) set to exact zeros;
        in place when asked (for tensors the engine owns), else a copy where anything changes."""
        if self.is_rows:
            if drop is None:
                return x
            mask = drop.reshape(-1, *([1] * (x.dim() - 1)))  # a mask, not boolean indexing: no host read
        else:
            dropped, anything = self._dropped_tokens(drop, x.device, with_any=True)
            if not anything:
                return x
            mask = dropped.reshape(*dropped.shape, *([1] * (x.dim() - 2)))
        return x.masked_fill_(mask, 0) if in_place else x.masked_fill(mask, 0)

    def token_mask(self, samples: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, T) bool: tokens whose sample is marked in `samples` (S,) bool (segment layouts)."""
        seg = self._segment_ids(device)
        return (seg >= 0) & samples.to(device)[seg.clamp(min=0)]

    # ------------------------------------------------------------------ internals
    def _segment_ids(self, device: torch.device) -> torch.Tensor:
        key = ("seg", device)
        if key not in self._cache:
            self._cache[key] = self.segment_ids.to(device)
        return self._cache[key]

    def _dropped_tokens(self, drop: torch.Tensor | None, device: torch.device, with_any: bool = False):
        """(B, T) bool: tokens of no sample or of a `drop` sample; with `with_any`, also whether there is one.
        Both are kept for the `drop` tensor last asked about: every layer of a micro-batch asks with the same
        one, so the mask is built, and `any()` read from the device, once per micro-batch, not once per layer."""
        key = ("dropped", device)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not drop:  # identity: the cache holds `drop`, so its id cannot be reused
            seg = self._segment_ids(device)
            mask = seg < 0
            if drop is not None:
                mask = mask | self.token_mask(drop, device)
            cached = self._cache[key] = [drop, mask, None]
        if not with_any:
            return cached[1]
        if cached[2] is None:
            cached[2] = bool(cached[1].any())
        return cached[1], cached[2]

    def _index(self, device: torch.device | None = None):
        """(index (S, L) of flat token positions, valid mask (S, L), lengths (S,)) for a segment layout."""
        device = self.segment_ids.device if device is None else device
        key = ("index", device)
        if key not in self._cache:
            seg = self.segment_ids.flatten()
            n, s = seg.numel(), self.num_samples
            valid = seg >= 0
            lengths = torch.bincount(seg[valid], minlength=s)
            pos = torch.arange(n, device=seg.device)
            prev = torch.cat([torch.full((1,), -2, dtype=seg.dtype, device=seg.device), seg[:-1]])
            starts = valid & (seg != prev)
            start = torch.zeros(s, dtype=torch.long, device=seg.device)
            start[seg[starts]] = pos[starts]  # one start per id (checked at construction)
            length = int(lengths.max())
            offs = torch.arange(length, device=seg.device)
            mask = offs.unsqueeze(0) < lengths.unsqueeze(1)
            index = torch.where(mask, start.unsqueeze(1) + offs.unsqueeze(0), torch.zeros((), dtype=torch.long,
                                device=seg.device))
            self._cache[key] = (index.to(device), mask.to(device), lengths.to(device))
        return self._cache[key]
