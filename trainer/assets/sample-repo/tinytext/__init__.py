"""Small text utilities."""

from .wrap import wrap, fill
from .slug import slugify
from .stats import word_count, top_words
from .case import snake_case, camel_case

__all__ = ["wrap", "fill", "slugify", "word_count", "top_words", "snake_case", "camel_case"]
