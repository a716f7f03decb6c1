"""Domain-labelled data for DoGraph: sources, the embedded corpus, tokenizers, packing, collator."""

from .collator import DomainCollator
from .corpus import DEFAULT_PROPORTIONS, embedded_documents, iter_embedded_documents
from .dataset import DomainDataset, build_domain_dataset
from .hub import HubAccessError, check_hub_resource
from .packing import PackingStats
from .sources import PILE_17_SUBSETS, SLIMPAJAMA_DOMAINS, iter_documents, load_documents
from .spec import DataError, DataSpec
from .tokenizers import load_tokenizer

__all__ = [
    "DEFAULT_PROPORTIONS",
    "DataError",
    "DataSpec",
    "DomainCollator",
    "DomainDataset",
    "HubAccessError",
    "PILE_17_SUBSETS",
    "PackingStats",
    "SLIMPAJAMA_DOMAINS",
    "build_domain_dataset",
    "check_hub_resource",
    "embedded_documents",
    "iter_documents",
    "iter_embedded_documents",
    "load_documents",
    "load_tokenizer",
]
