"""`DataSpec`: the `data:` section of a recipe, one documented field per setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputFileError

SOURCES = ("embedded", "hub", "local", "folder")
PACKING = ("pack", "truncate")


class DataError(ValueError):
    """A data setting or a data source is wrong; the message names the field or the cause."""


class DataFileError(InputFileError, DataError):
    """A data file cannot be read (not UTF-8, a malformed line...): names the file, the line and the fix."""


@dataclass
class DataSpec:
    """Where the domain-labelled text comes from and how it becomes training sequences."""

    source: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (the built-in generated corpus, no files or network), 'hub' (a Hub dataset "
            "by `name`), 'local' (json/jsonl/parquet/csv/txt files at `path` with a label field), "
            "'folder' (one sub-folder per domain at `path`: the folder name is the label)."
        },
    )
    name: str | None = field(default=None, metadata={"help": "Hub dataset id (source 'hub')."})
    config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if any."})
    split: str = field(default="train", metadata={"help": "Hub dataset split to read."})
    path: Any = field(
        default=None,
        metadata={"help": "A file, a glob, a list of them (source 'local'), or a folder (source 'folder')."},
    )
    text_field: str = field(default="text", metadata={"help": "Field holding the document text."})
    label_field: str | None = field(
        default=None,
        metadata={
            "help": "Field holding the human domain label; dots reach into nested records "
            "('meta.redpajama_set_name'). Not used by 'folder' and 'embedded'."
        },
    )
    domains: list[str] | None = field(
        default=None,
        metadata={
            "help": "Keep only documents with these labels; their order gives the domain ids. Required with "
            "streaming (the label set must be known before the stream is read). Default: all labels, sorted."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read and pack lazily (for corpora that do not fit on disk or in memory)."},
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "Read at most this many documents (None: all)."}
    )
    shuffle_buffer: int = field(
        default=10_000, metadata={"help": "Streaming: documents held in the shuffle buffer (0 or 1: no shuffle)."}
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per training sequence."})
    packing: str = field(
        default="pack",
        metadata={
            "help": "'pack': concatenate the documents of each domain (EOS between them) and cut blocks of "
            "seq_len, so every block has one domain and no token is lost; 'truncate': one sequence per "
            "document, cut at seq_len."
        },
    )
    add_eos: bool = field(default=True, metadata={"help": "Append the tokenizer's EOS to every document."})
    validation_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Share of each domain's sequences held out for validation (at least one per domain that "
            "has two or more). Map-style data only; see validation_documents for streaming."
        },
    )
    max_validation_sequences_per_domain: int | None = field(
        default=None, metadata={"help": "Cap on each domain's validation sequences (None: no cap)."}
    )
    validation_documents: int = field(
        default=2_000,
        metadata={
            "help": "Streaming: the first N documents of the stream are held out (packed per domain as the "
            "validation set) and training skips them."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the validation split and the streaming shuffle."})
    embedded_chars: int = field(
        default=600_000, metadata={"help": "Embedded corpus: total size in characters."}
    )
    embedded_proportions: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "Embedded corpus: share of each domain (prose, code, dialogue, tables, arithmetic). "
            "Default: prose 0.60, code 0.20, dialogue 0.10, tables 0.08, arithmetic 0.02."
        },
    )

    def validate(self) -> None:
        """Raise `DataError` naming the field for any inconsistent setting."""
        if self.source not in SOURCES:
            raise DataError(f"data.source={self.source!r} is unknown: use one of {', '.join(SOURCES)}")
        if self.packing not in PACKING:
            raise DataError(f"data.packing={self.packing!r} is unknown: use one of {', '.join(PACKING)}")
        if self.source == "hub" and not self.name:
            raise DataError("data.name is missing: source 'hub' needs a Hub dataset id (e.g. DKYoon/SlimPajama-6B)")
        if self.source in ("local", "folder") and not self.path:
            raise DataError(f"data.path is missing: source {self.source!r} needs a path")
        if self.source in ("hub", "local") and not self.label_field:
            raise DataError(
                f"data.label_field is missing: source {self.source!r} needs the field that holds the domain "
                "label (e.g. meta.redpajama_set_name)"
            )
        if self.streaming and self.source != "embedded" and not self.domains:
            raise DataError("data.domains is missing: streaming needs the list of domain labels up front")
        if self.domains is not None and (
            not isinstance(self.domains, (list, tuple)) or len(set(map(str, self.domains))) != len(self.domains)
        ):
            raise DataError(f"data.domains must be a list of distinct labels, got {self.domains!r}")
        if int(self.seq_len) < 2:
            raise DataError(f"data.seq_len={self.seq_len} must be >= 2")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise DataError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1)")
        if self.max_documents is not None and int(self.max_documents) < 1:
            raise DataError(f"data.max_documents={self.max_documents} must be >= 1 (or null for all)")
        if self.max_validation_sequences_per_domain is not None and int(self.max_validation_sequences_per_domain) < 0:
            raise DataError("data.max_validation_sequences_per_domain must be >= 0 (or null)")
        if int(self.validation_documents) < 0:
            raise DataError(f"data.validation_documents={self.validation_documents} must be >= 0")
        if int(self.embedded_chars) < 100:
            raise DataError(f"data.embedded_chars={self.embedded_chars} must be >= 100")
        if self.source == "embedded":
            from .corpus import normalize_proportions

            try:
                normalize_proportions(self.embedded_proportions)
            except ValueError as err:
                raise DataError(f"data.embedded_proportions: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_spec_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DataSpec)]
