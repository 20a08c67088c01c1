"""URL slugs."""

import re
import unicodedata


def slugify(text, separator="-", max_length=None):
    """Lower-case ASCII words of `text` joined by `separator`.

    With `max_length`, whole words are kept while the slug fits; a first word longer than
    `max_length` is cut.
    """
    normalized = unicodedata.normalize("NFKD", text)
    ascii_text = normalized.encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = separator.join(words)
    if max_length is None or len(slug) <= max_length:
        return slug
    kept = []
    for word in words:
        candidate = separator.join(kept + [word])
        if len(candidate) > max_length:
            break
        kept.append(word)
    if not kept:
        return words[0][:max_length]
    return separator.join(kept)
