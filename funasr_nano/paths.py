"""Where the command lines keep the release and the exported models when no folder is named.

Run from a checkout (the numbered scripts, `pip install -e .`, or a copy of the package next to
them), the defaults are in the project folder, beside the scripts, as they always were: `model-gguf/`
and `Fun-ASR-Nano-2512/`. Installed into site-packages (`pip install funasr-nano`), that folder is
the Python library folder, which is no place for 2 GB of weights: the defaults then live in a
per-user data folder, `~/.cache/funasr-nano/` (`$XDG_CACHE_HOME/funasr-nano/` when that is set), so
that `funasr-nano transcribe` finds the same models from whatever folder it is run in.
`FUNASR_NANO_HOME` overrides both. Only the standard library is imported here (`requirements.py`
reads it in a Python that may lack everything else).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

HOME_ENV = "FUNASR_NANO_HOME"
PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_DIR_NAME = "model-gguf"
RELEASE_DIR_NAME = "Fun-ASR-Nano-2512"
# the numbered scripts' names, for messages that give a command (see `command_prefix`)
SCRIPT_EXPORT_ONNX = "01_export_onnx.py"
SCRIPT_EXPORT_GGUF = "02_export_gguf.py"
CONSOLE_SCRIPT = "funasr-nano"


def _installed(package_dir: Path) -> bool:
    """Whether the package was installed into a library folder (not run from a checkout or a copy)."""
    parent = package_dir.parent
    if parent.name in ("site-packages", "dist-packages"):
        return True
    library_folders = {sysconfig.get_paths().get(key) for key in ("purelib", "platlib")}
    return any(folder and Path(folder).resolve() == parent for folder in library_folders)


INSTALLED = _installed(PACKAGE_DIR)
# the checkout the package runs from (the folder of the numbered scripts and requirements files), or None
CHECKOUT_DIR: Path | None = None if INSTALLED else PACKAGE_DIR.parent


def _user_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "funasr-nano"


def data_dir() -> Path:
    """The folder holding the default model and release folders ($FUNASR_NANO_HOME, the checkout, or the user's)."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    return CHECKOUT_DIR if CHECKOUT_DIR is not None else _user_data_dir()


def data_dir_note() -> str:
    """Where `data_dir()` comes from, for --help: a user who finds models in an odd place learns why."""
    if os.environ.get(HOME_ENV):
        return f"${HOME_ENV}"
    return "the project folder" if CHECKOUT_DIR is not None else f"the user's data folder; ${HOME_ENV} moves it"


def from_numbered_script(argv0: str) -> bool:
    """Whether this process was started as one of the numbered scripts (their messages give script commands)."""
    name = os.path.basename(argv0)
    return name[:2].isdigit() and name.endswith(".py")
