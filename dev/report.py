"""
What the lab writes: a file replaced in one step, and the section of a markdown file that a script
generates, between its two marker lines (dev/ablate.py's tables, dev/drift.py's).
"""

import os


def write_atomically(path, text):
    """Writes text to path through a temporary file, so that an interrupted write leaves the old file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_section(path, markers, body, heading):
    """body between the two marker lines of the markdown file at path, the text around them left as
    it is; a file without them (or no file yet) gets `heading`, the markers and the body at its end."""
    begin, end = markers
    block = f"{begin}\n{body}\n{end}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        text = ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{heading}\n\n{block}\n"
    write_atomically(path, text)
