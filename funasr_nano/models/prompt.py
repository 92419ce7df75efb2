"""The prompt exactly as the official `FunASRNano` builds it, split around the audio slot.

funasr writes one ChatML string with a `<|startofspeech|>!!<|endofspeech|>`
marker, splits it at the marker, tokenizes each text part on its own and puts
the audio embeddings where the marker was. We keep the same two text parts:
`before` (system turn, user turn opening and the task prompt) and `after`
(closing the user turn and opening the assistant's, which must end in
`assistant\\n`). `before` depends only on the options, so its KV cache can be
shared by every segment of a file.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_PROMPT = "You are a helpful assistant."
HOTWORD_PREAMBLE = (
    "请结合上下文信息，更加准确地完成语音转写任务。如果没有相关信息，我们会留空。\n\n\n**上下文信息：**\n\n\n"
)
THINK_BLOCK = "<think>\n\n</think>\n\n"

# The checkpoints of the family this runtime runs, by the name their release folders carry.
NANO = "Fun-ASR-Nano-2512"
MLT = "Fun-ASR-MLT-Nano-2512"

# The languages each checkpoint takes in its prompt (`语音转写成{name}`), by ISO 639 code (639-1 where there is
# one; Cantonese `yue` and Filipino `fil` are 639-3). funasr's FunASRNano documents Chinese, English and Japanese
# for Nano (its dialects are written in Chinese) and 31 languages for MLT-Nano, named as in Fun-ASR's README.
NANO_LANGUAGES: dict[str, str] = {"zh": "中文", "en": "英文", "ja": "日文"}
MLT_LANGUAGES: dict[str, str] = {
    "zh": "中文", "en": "英文", "yue": "粤语", "ja": "日文", "ko": "韩文", "vi": "越南语", "id": "印尼语", "th": "泰语",
    "ms": "马来语", "fil": "菲律宾语", "ar": "阿拉伯语", "hi": "印地语", "bg": "保加利亚语", "hr": "克罗地亚语",
    "cs": "捷克语", "da": "丹麦语", "nl": "荷兰语", "et": "爱沙尼亚语", "fi": "芬兰语", "el": "希腊语", "hu": "匈牙利语",
    "ga": "爱尔兰语", "lv": "拉脱维亚语", "lt": "立陶宛语", "mt": "马耳他语", "pl": "波兰语", "pt": "葡萄牙语",
    "ro": "罗马尼亚语", "sk": "斯洛伐克语", "sl": "斯洛文尼亚语", "sv": "瑞典语",
}
CHECKPOINT_LANGUAGES: dict[str, dict[str, str]] = {NANO: NANO_LANGUAGES, MLT: MLT_LANGUAGES}
# Other spellings of a code: Tagalog's 639-1 code for Filipino, 639-2/3 codes of the 639-1 ones people also use.
_CODE_ALIASES = {"tl": "fil", "tgl": "fil", "zho": "zh", "chi": "zh", "eng": "en", "jpn": "ja", "kor": "ko",
                 "cmn": "zh", "ind": "id", "in": "id"}
LANGUAGES = NANO_LANGUAGES  # the default checkpoint's, for callers that know no model
AUTO_LANGUAGE = "auto"  # no language in the prompt: the model decides, as with no --language


class LanguageError(ValueError):
    """A language the model does not take; the message lists the ones it does."""


@dataclass(frozen=True)
class PromptOptions:
    """What the user can ask for; the same switches as funasr's `generate(language=, itn=, hotwords=)`."""

    language: str | None = None
    itn: bool = True
    hotwords: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptParts:
    """The text on each side of the audio embeddings."""

    before: str
    after: str


def task_prompt(options: PromptOptions) -> str:
    """funasr's `get_prompt`: hotword preamble, `语音转写` (+ `成{language}`), `，不进行文本规整` without ITN, a colon."""
    text = ""
    if options.hotwords:
        text = HOTWORD_PREAMBLE + f"热词列表：[{', '.join(options.hotwords)}]\n"
    text += "语音转写" if options.language is None else f"语音转写成{options.language}"
    if not options.itn:
        text += "，不进行文本规整"
    return text + "："


def build_prompt(options: PromptOptions, *, sys_prompt: bool = True, do_think: bool = True) -> PromptParts:
    """The ChatML around the audio, following `data_load_speech` (first turn, no assistant input).

    `sys_prompt` and `do_think` come from config.yaml's dataset_conf; both default to
    true in funasr. `do_think: false` appends an empty think block after `assistant\\n`.
    """
    user = task_prompt(options)
    before = f"<|im_start|>user\n{user}"
    if sys_prompt:
        before = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n" + before
    after = "<|im_end|>\n<|im_start|>assistant\n"
    if not do_think:
        after += THINK_BLOCK
    return PromptParts(before=before, after=after)


def language_choices(languages: dict[str, str] = LANGUAGES) -> str:
    """The accepted values, for help texts and error messages: `中文 (zh), 英文 (en), 日文 (ja), auto`."""
    return ", ".join(f"{name} ({code})" for code, name in languages.items()) + f", {AUTO_LANGUAGE}"


def checkpoint_languages(checkpoint: str) -> dict[str, str]:
    """The languages of a checkpoint by name; an unknown name (a later release) gets Nano's, the ones all take."""
    return CHECKPOINT_LANGUAGES.get(checkpoint, NANO_LANGUAGES)


def resolve_language(value: str | None, languages: dict[str, str] = LANGUAGES, checkpoint: str = NANO) -> str | None:
    """The prompt's name for a language given as that name or an ISO code (`en`, `EN`, `en-US`, `英文`, `yue`).

    `languages`: those of the checkpoint in use (`checkpoint`, named in the error). None, "" and "auto"
    give None (no language in the prompt). Anything else raises LanguageError: the prompt would
    otherwise carry it verbatim and the model would be asked for a language it was never trained
    to write.
    """
    text = (value or "").strip()
    if not text or text.lower() == AUTO_LANGUAGE:
        return None
    if text in languages.values():
        return text
    code = text.replace("_", "-").split("-", 1)[0].lower()  # a region tag (en-US, zh_CN) does not matter
    code = _CODE_ALIASES.get(code, code)
    if code in languages:
        return languages[code]
    raise LanguageError(f"unknown language {value!r}; {checkpoint} takes {language_choices(languages)}")


def language_code(name: str | None, languages: dict[str, str] = MLT_LANGUAGES) -> str | None:
    """The ISO code of a language as the prompt names it (英文 -> en); None stays None."""
    if name is None:
        return None
    return next((code for code, n in languages.items() if n == name), name)


def parse_hotwords(text: str | None) -> tuple[str, ...]:
    """`--hotwords "w1,w2"` -> ("w1", "w2"); full-width commas too, blanks dropped."""
    if not text:
        return ()
    return tuple(w.strip() for w in text.replace("，", ",").split(",") if w.strip())
