"""Data: readers with clear errors, chat formatting with response-only labels, built-in sets and their splits."""

from .builtin import builtin_split, load_builtin, resolve_prompts, split_records
from .chat import IGNORE_INDEX, Encoded, encode_example, prompt_ids, prompt_text
from ..errors import DataError
from .readers import Record, read_records

__all__ = [
    "DataError", "Encoded", "IGNORE_INDEX", "Record", "builtin_split", "encode_example", "load_builtin",
    "prompt_ids", "prompt_text", "read_records", "resolve_prompts", "split_records",
]
