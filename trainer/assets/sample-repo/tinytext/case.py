"""Case conversion between snake_case, camelCase and Title Case."""

import re

_BOUNDARY = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def split_words(name):
    """Split an identifier in any of the supported styles into lower-case words."""
    parts = []
    for chunk in re.split(r"[\s_\-]+", name):
        parts.extend(_BOUNDARY.findall(chunk))
    return [p.lower() for p in parts if p]


def snake_case(name):
    return "_".join(split_words(name))


def camel_case(name):
    words = split_words(name)
    if not words:
        return ""
    return words[0] + "".join(w.capitalize() for w in words[1:])


def title_case(name):
    return " ".join(w.capitalize() for w in split_words(name))
