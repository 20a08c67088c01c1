"""Greedy word wrapping."""


def wrap(text, width):
    """Split text into lines of at most `width` characters, breaking between words.

    A word longer than `width` gets a line of its own.
    """
    if width < 1:
        raise ValueError("width must be at least 1")
    lines = []
    current = ""
    for word in text.split():
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= width:
            current += " " + word
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def fill(text, width):
    """Wrap each paragraph of text (paragraphs are separated by blank lines) and join the
    lines with newlines, keeping one blank line between paragraphs."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    return "\n\n".join("\n".join(wrap(p, width)) for p in paragraphs)
