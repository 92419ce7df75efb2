"""The language of a transcript's text, from the scripts it is written in.

Fun-ASR-Nano-2512 writes Chinese, English or Japanese (its dialects in Chinese characters) and says
nothing about which: with no language in the prompt the transcript's JSON would say `null` and the
server `auto`. The text itself tells, by its characters:

- any kana (hiragana, katakana): `ja` (Chinese is never written with kana, Japanese nearly always is);
- otherwise Han characters against Latin-script words, the larger count wins, a tie goes to `zh`
  ("我们用Kubernetes部署" is Chinese with an English word in it: 5 Han characters, 1 word);
- Latin-script words only: `en` (the one Latin-script language the model writes);
- no letters at all (empty text, digits, punctuation): None.

Fun-ASR-MLT-Nano-2512 writes 31 languages. Where a script belongs to one of them only, the script
tells: Hangul `ko`, Thai `th`, Arabic `ar`, Devanagari `hi`, Greek `el`, Cyrillic `bg` (its one
Cyrillic language). Han stays `zh` (Cantonese is written with the same characters). Twenty of its
languages are written in Latin script, so a Latin-script text from MLT-Nano gets None: the script
cannot tell Polish from Swedish, and a guess would be reported as a fact.

A language given in the request is reported as given: the model was asked to write it.
"""

from __future__ import annotations

import unicodedata

from funasr_nano.models.prompt import NANO_LANGUAGES

_KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))  # hiragana, katakana (+ extensions, half-width)
_HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
# Scripts that belong to one language of the MLT list, by the word in their Unicode character names.
_ONE_LANGUAGE_SCRIPTS = {"HANGUL": "ko", "THAI": "th", "ARABIC": "ar", "DEVANAGARI": "hi", "GREEK": "el",
                         "CYRILLIC": "bg"}
# The languages of both lists written in Latin script; English is the only one of Nano's.
_LATIN_SCRIPT = frozenset({"en", "vi", "id", "ms", "fil", "hr", "cs", "da", "nl", "et", "fi", "hu", "ga", "lv", "lt",
                           "mt", "pl", "pt", "ro", "sk", "sl", "sv"})


def _within(ch: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in ranges)


def text_language(text: str, languages: dict[str, str] = NANO_LANGUAGES) -> str | None:
    """The ISO code by the rules above, among the `languages` of the checkpoint that wrote `text`, or None."""
    han = latin_words = 0
    other: dict[str, int] = {}
    in_word = False
    for ch in text:
        if _within(ch, _KANA) and ch != "\u30fb":  # the katakana middle dot is punctuation in Chinese too
            if "ja" in languages:
                return "ja"
            continue
        if _within(ch, _HAN):
            han += 1
            in_word = False
        elif ch.isalpha():
            name = unicodedata.name(ch, "")
            if "LATIN" in name:
                latin_words += not in_word
                in_word = True
                continue
            script = next((code for word, code in _ONE_LANGUAGE_SCRIPTS.items() if word in name), None)
            if script is not None and script in languages:
                other[script] = other.get(script, 0) + 1
            in_word = False
        elif not (ch == "'" and in_word):  # an apostrophe inside a word (don't) does not start a new one
            in_word = False
    if other:
        return max(other, key=lambda code: other[code])
    if han == 0 and latin_words == 0:
        return None
    if han >= latin_words:
        return "zh"
    latin = [code for code in languages if code in _LATIN_SCRIPT]
    return latin[0] if len(latin) == 1 else None
