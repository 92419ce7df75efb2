"""The language of a transcript's text, from the scripts it is written in.

Fun-ASR-Nano-2512 writes Chinese, English or Japanese (its dialects in Chinese characters) and says
nothing about which: with no language in the prompt the transcript's JSON would say `null` and the
server `auto`. The text itself tells, by its characters:

- any kana (hiragana, katakana): `ja` (Chinese is never written with kana, Japanese nearly always is);
- otherwise Han characters against Latin-script words, the larger count wins, a tie goes to `zh`
  ("我们用Kubernetes部署" is Chinese with an English word in it: 5 Han characters, 1 word);
- Latin-script words only: `en` (the one Latin-script language the model writes);
- no letters at all (empty text, digits, punctuation): None.

A language given in the request is reported as given: the model was asked to write it.
"""

from __future__ import annotations

import unicodedata

from funasr_nano.models.prompt import LANGUAGES

_KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))  # hiragana, katakana (+ extensions, half-width)
_HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))


def _within(ch: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in ranges)


def text_language(text: str) -> str | None:
    """`zh`, `en`, `ja` by the rule above, or None when the text has no letters."""
    han = latin_words = 0
    in_word = False
    for ch in text:
        if _within(ch, _KANA) and ch != "\u30fb":  # the katakana middle dot is punctuation in Chinese too
            return "ja"
        if _within(ch, _HAN):
            han += 1
            in_word = False
        elif ch.isalpha() and "LATIN" in unicodedata.name(ch, ""):
            latin_words += not in_word
            in_word = True
        elif not (ch == "'" and in_word):  # an apostrophe inside a word (don't) does not start a new one
            in_word = False
    if han == 0 and latin_words == 0:
        return None
    return "zh" if han >= latin_words else "en"


def language_code(prompt_language: str | None) -> str | None:
    """The ISO 639-1 code of a language as the prompt names it (英文 -> en); None stays None."""
    if prompt_language is None:
        return None
    return next((code for code, name in LANGUAGES.items() if name == prompt_language), prompt_language)
