"""Decoded text as funasr prints it: its post-processing of one segment, and segments joined."""

from __future__ import annotations

import re


def clean_text(raw: str) -> str:
    """funasr's post-processing of the decoded text: `/sil` -> space, whitespace runs collapsed."""
    return re.sub(r"\s+", " ", raw.replace("/sil", " "))


def join_texts(parts: list[str]) -> str:
    """Join segment texts: a space between Latin-script words, nothing between CJK characters.

    A single segment is returned untouched, exactly as the official code would print it.
    """
    if len(parts) == 1:
        return parts[0]
    out = ""
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if out and out[-1].isascii() and out[-1].isalnum() and part[0].isascii() and part[0].isalnum():
            out += " "
        elif out and out[-1] in ".,!?;:" and part[0].isascii():
            out += " "
        out += part
    return out


__all__ = ["clean_text", "join_texts"]
