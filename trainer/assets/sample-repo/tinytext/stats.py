"""Word statistics."""

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text):
    """The words of `text`, lower-cased."""
    return [w.lower() for w in _WORD.findall(text)]


def word_count(text):
    """Number of words in `text`."""
    return len(words(text))


def top_words(text, n):
    """The `n` most frequent words as (word, count) pairs, most frequent first; ties are
    broken alphabetically."""
    counts = Counter(words(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:n]


def average_word_length(text):
    """Mean length of the words of `text`; 0.0 for a text without words."""
    ws = words(text)
    if not ws:
        return 0.0
    return sum(len(w) for w in ws) / len(ws)
