"""Domain-labelled documents from the embedded corpus, the Hub, local files or per-domain folders.

Every source yields `(text, label)` pairs, label a string: the packing code does not care
where text comes from, and map-style and streaming data share one reader.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .corpus import embedded_domain_names, iter_embedded_documents
from .spec import DataError, DataFileError, DataSpec

logger = logging.getLogger(__name__)

# The Pile without its copyright-problem subsets, as the paper trains its LLaMA models. The paper
# says "17 subsets"; that is the Pile's 22 less Books3, BookCorpus2, OpenSubtitles,
# YoutubeSubtitles and OpenWebText2, i.e. the widely used "uncopyrighted" Pile
# (Hub: monology/pile-uncopyrighted). PAPER_FACTS' transcription also lists OpenWebText2, which
# makes 18 names: add "OpenWebText2" to a recipe's data.domains to follow that reading.
PILE_17_SUBSETS: tuple[str, ...] = (
    "Pile-CC",
    "PubMed Central",
    "ArXiv",
    "Github",
    "FreeLaw",
    "StackExchange",
    "USPTO Backgrounds",
    "PubMed Abstracts",
    "Gutenberg (PG-19)",
    "Wikipedia (en)",
    "DM Mathematics",
    "Ubuntu IRC",
    "EuroParl",
    "HackerNews",
    "PhilPapers",
    "NIH ExPorter",
    "Enron Emails",
)

# SlimPajama's seven sources as `meta.redpajama_set_name` spells them.
SLIMPAJAMA_DOMAINS: tuple[str, ...] = (
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaGithub",
    "RedPajamaBook",
    "RedPajamaArXiv",
    "RedPajamaWikipedia",
    "RedPajamaStackExchange",
)

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".jsonl.gz", ".json.gz", ".jsonl.zst")


def get_field(record: dict, dotted: str) -> Any:
    """`record["a"]["b"]` for `dotted="a.b"`; a nested JSON string is decoded on the way.

    Raises `KeyError(dotted)` when the path does not exist.
    """
    value: Any = record
    for part in dotted.split("."):
        if isinstance(value, str):  # some corpora keep `meta` as a JSON string
            try:
                value = json.loads(value)
            except ValueError:
                raise KeyError(dotted) from None
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _describe_fields(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, dict):
            parts.append(f"{key}.{{{', '.join(map(str, value))}}}")
        else:
            parts.append(str(key))
    return ", ".join(parts)


def _labelled(records: Iterable[dict], spec: DataSpec, where: str, label: str | None = None) -> Iterator[tuple[str, str]]:
    """(text, label) from raw records; the first record's fields are checked (a named error)."""
    first = True
    skipped = 0
    for record in records:
        try:
            text = get_field(record, spec.text_field)
        except KeyError:
            if first:
                raise DataError(
                    f"data.text_field={spec.text_field!r} not found in {where}; its fields are: "
                    f"{_describe_fields(record)}"
                ) from None
            skipped += 1
            continue
        if label is None:
            try:
                value = get_field(record, spec.label_field)
            except KeyError:
                if first:
                    raise DataError(
                        f"data.label_field={spec.label_field!r} not found in {where}; its fields are: "
                        f"{_describe_fields(record)}"
                    ) from None
                skipped += 1
                continue
        else:
            value = label
        first = False
        if text is None or value is None:
            skipped += 1
            continue
        yield str(text), str(value)
    if skipped:
        logger.warning("%s: skipped %d records without a text or a label", where, skipped)


_JSONL_FIX = "correct or delete that line: every line of a JSON Lines file must be one complete JSON object"
_UTF8_FIX = ("re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`), or remove it from "
             "data.path")


def _binary_stream(path: Path):
    """The file's bytes (decompressed for .gz and .zst)."""
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):  # the Pile's format
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line as text with its line break) of a UTF-8 file.

    Decoded line by line from bytes, so that a byte that is not UTF-8 is reported with its line and
    byte offset (counted in the decompressed data for .gz/.zst), not as a position in a read buffer.
    A UTF-8 byte-order mark at the start is dropped.
    """
    offset = 0
    compressed = path.name.endswith((".gz", ".zst"))
    with _binary_stream(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                start = err.start + (3 if number == 1 and raw.startswith(b"\xef\xbb\xbf") else 0)
                raise DataFileError(
                    path, f"not UTF-8 text (byte 0x{raw[start]:02x}" + (", offset in the decompressed data)"
                                                                      if compressed else ")"),
                    _UTF8_FIX, line=number, byte_offset=offset + start,
                ) from None
            yield number, text
            offset += len(raw)


def _record(value: Any, path: Path, line: int | None, item: int | None = None) -> dict:
    if isinstance(value, dict):
        return value
    where = f"item {item} of the JSON list" if item is not None else "this line"
    raise DataFileError(path, f"{where} is a JSON {type(value).__name__}, not an object ({{\"text\": ..., ...}})",
                        "write one JSON object per record, with the text and label fields", line=line)


def _read_json_file(path: Path, name: str) -> Iterator[dict]:
    """Records of a JSON Lines file, or of a .json file holding one JSON list."""
    lines = _decoded_lines(path)
    for number, text in lines:
        if not text.strip():
            continue
        if text.lstrip().startswith("[") and ".jsonl" not in name:  # one JSON list
            whole = text + "".join(t for _, t in lines)
            try:
                items = json.loads(whole)
            except json.JSONDecodeError as err:
                raise DataFileError(path, f"not valid JSON ({err.msg})", "correct the file: it must hold one JSON list "
                                    "of objects, or one JSON object per line", line=number - 1 + err.lineno,
                                    column=err.colno) from None
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                yield _record(item, path, None, item=i)
            return
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(path, f"not valid JSON ({err.msg})", _JSONL_FIX, line=number,
                                column=err.colno) from None
        yield _record(value, path, number)


def _read_file(path: Path, text_field: str) -> Iterator[dict]:
    """Records of one local file, by suffix (json lines, a json list, parquet, csv, plain text).

    A malformed file raises `DataFileError` naming the file, the line (1-based) and the fix.
    """
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst")):
        yield from _read_json_file(path, name)
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise DataFileError(path, f"not a readable Parquet file ({err})",
                                "re-write it (e.g. with pandas.DataFrame.to_parquet), or remove it from data.path") from None
    elif name.endswith(".csv"):
        reader = csv.DictReader(text for _, text in _decoded_lines(path))
        try:
            yield from reader
        except csv.Error as err:
            raise DataFileError(path, f"not valid CSV ({err})", "correct that line (quotes must be closed)",
                                line=reader.line_num) from None
    elif name.endswith(".txt"):
        yield {text_field: "".join(text for _, text in _decoded_lines(path))}
    else:
        raise DataError(f"data.path: cannot read {path}: use one of {', '.join(_FILE_SUFFIXES)}")


def _expand_paths(path: Any) -> list[Path]:
    patterns = path if isinstance(path, (list, tuple)) else [path]
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(str(pattern)).expanduser())
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"data.path={pattern!r}: no such file")
        for match in matches:
            p = Path(match)
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(_FILE_SUFFIXES)) if p.is_dir() else [p])
    if not files:
        raise DataError(f"data.path={path!r}: no readable files ({', '.join(_FILE_SUFFIXES)})")
    return files


def folder_domains(root: str | Path) -> dict[str, list[Path]]:
    """Per-domain files of a folder source: each sub-folder is a domain (sorted by name)."""
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a folder (source 'folder' needs one sub-folder per domain)")
    domains = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.name.lower().endswith(_FILE_SUFFIXES))
        if files:
            domains[sub.name] = files
    if not domains:
        raise DataError(f"data.path={str(root)!r} has no sub-folder with data files ({', '.join(_FILE_SUFFIXES)})")
    return domains


def _iter_folder(spec: DataSpec, wanted: set[str] | None) -> Iterator[tuple[str, str]]:
    """Documents of a folder source, interleaved across domains in proportion to their size in
    bytes, so that a prefix of the stream (max_documents, streaming) is a fair sample."""
    per_domain = {d: files for d, files in folder_domains(spec.path).items() if wanted is None or d in wanted}
    iterators = {}
    remaining = {}
    for domain, files in per_domain.items():
        records = (rec for f in files for rec in _read_file(f, spec.text_field))
        iterators[domain] = _labelled(records, spec, f"{spec.path}/{domain}", label=domain)
        remaining[domain] = float(sum(f.stat().st_size for f in files)) or 1.0
    rng = random.Random(f"{spec.seed}:folder")
    live = list(iterators)
    while live:
        domain = rng.choices(live, weights=[max(remaining[d], 1.0) for d in live])[0]
        try:
            text, label = next(iterators[domain])
        except StopIteration:
            live.remove(domain)
            continue
        remaining[domain] -= len(text.encode("utf-8"))
        yield text, label


def _iter_hub(spec: DataSpec) -> Iterator[tuple[str, str]]:
    from datasets import load_dataset

    from .hub import check_hub_resource

    check_hub_resource(spec.name, "dataset", what="data.name", streaming=spec.streaming)
    ds = load_dataset(spec.name, spec.config_name, split=spec.split, streaming=spec.streaming)
    top = {spec.text_field.split(".")[0], spec.label_field.split(".")[0]}
    names = getattr(ds, "column_names", None)
    if names:  # keep only what we read: far less to decode
        missing = [c for c in top if c not in names]
        if missing:
            field_name = "text_field" if missing[0] == spec.text_field.split(".")[0] else "label_field"
            raise DataError(
                f"data.{field_name}={getattr(spec, field_name)!r} not found in Hub dataset {spec.name!r}; "
                f"its columns are: {', '.join(names)}"
            )
        ds = ds.select_columns(sorted(top))
    yield from _labelled(iter(ds), spec, f"Hub dataset {spec.name!r}")


def _buffer_shuffle(items: Iterator, buffer_size: int, seed: int) -> Iterator:
    """Approximate shuffle of a stream with a fixed-size buffer (as `datasets` does)."""
    if buffer_size <= 1:
        yield from items
        return
    rng = random.Random(f"{seed}:shuffle")
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def iter_documents(spec: DataSpec) -> Iterator[tuple[str, str]]:
    """All `(text, label)` documents of the source, filtered to `spec.domains` when given,
    at most `spec.max_documents` of them. Not shuffled."""
    wanted = set(map(str, spec.domains)) if spec.domains else None
    if spec.source == "embedded":
        docs: Iterator[tuple[str, str]] = iter_embedded_documents(
            spec.embedded_chars, spec.embedded_proportions, spec.seed
        )
    elif spec.source == "hub":
        docs = _iter_hub(spec)
    elif spec.source == "local":
        files = _expand_paths(spec.path)
        records = (rec for f in files for rec in _read_file(f, spec.text_field))
        docs = _labelled(records, spec, f"{spec.path}")
    elif spec.source == "folder":
        docs = _iter_folder(spec, wanted)
    else:
        raise DataError(f"data.source={spec.source!r} is unknown")
    count = 0
    for text, label in docs:
        if wanted is not None and label not in wanted:
            continue
        if spec.max_documents is not None and count >= int(spec.max_documents):
            return
        count += 1
        yield text, label


def source_domain_names(spec: DataSpec) -> list[str] | None:
    """The domain names (id order) known without reading the data, or None."""
    if spec.domains:
        return [str(d) for d in spec.domains]
    if spec.source == "embedded":
        return embedded_domain_names(spec.embedded_proportions)
    if spec.source == "folder":
        return list(folder_domains(spec.path))
    return None


def load_documents(spec: DataSpec) -> tuple[list[tuple[str, str]], list[str]]:
    """All documents in memory (map-style data) and the domain names in id order."""
    docs = list(iter_documents(spec))
    names = source_domain_names(spec)
    if names is None:
        names = sorted({label for _, label in docs})
    present = {label for _, label in docs}
    if not docs:
        raise DataError(f"no documents read from data.source={spec.source!r} (check data.path / data.domains)")
    absent = [n for n in names if n not in present]
    if spec.domains and absent:
        logger.warning("data.domains lists labels with no document: %s", absent)
    return docs, names
