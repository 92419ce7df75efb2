"""What each script needs installed, checked before it runs, so a missing package is one line, not a traceback.

The numbered scripts and the `funasr-nano` subcommands wrap their `main` in `guarded(program, *extras)`:
the top-level modules of each extra are looked up first (`importlib.util.find_spec`, nothing is
imported), and a module still missing later (imported lazily deep inside) is caught too. Either way
the user gets one `error:` line naming the module, the Python that lacks it and the command that
installs its extra, and exit code 2 (what the command lines use for set-up problems). The command
depends on how the package is there: installed, the pip extra (`pip install "funasr-nano[server]"`);
run from a checkout, its requirements file (`pip install -r requirements-server.txt`), which lists
the same packages and versions as the extra (tests/test_packaging.py keeps them equal).

Only the standard library is imported here: this module must work in the bare Python a user forgot
to leave for the project's virtual environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from funasr_nano.paths import CHECKOUT_DIR

EXIT_SETUP = 2
DISTRIBUTION = "funasr-nano"
# torch's CPU build from PyTorch's own index: on PyPI the same version is the CUDA build (several GB),
# which pip would otherwise pick while resolving funasr. Export runs on the CPU; never install torchaudio.
TORCH_VERSION = "2.13.0"
TORCH_CPU_COMMAND = f"pip install torch=={TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Extra:
    """One pip extra and its requirements file: the modules a command imports from it, and what installs it."""

    modules: tuple[str, ...]
    requirements: str  # the file in a checkout, listing the same packages as the extra
    extra: str | None  # the pip extra's name (None: the base install)
    before: str = ""  # a command that must run first (torch's CPU wheel before funasr resolves it)


EXTRAS: dict[str, Extra] = {
    # inference: what transcribe, serve, mic and the corpus workers load (no torch, transformers, funasr)
    "base": Extra(("numpy", "onnxruntime", "llama_cpp", "soundfile", "soxr", "av", "gguf", "kaldi_native_fbank",
                   "tqdm", "yaml"), "requirements.txt", None),
    # the export (01, 02, `funasr-nano export`, and transcribe's first use): torch and the official model code
    "export": Extra(("torch", "funasr", "transformers", "onnx", "onnxscript"), "requirements-export.txt",
                    "export", TORCH_CPU_COMMAND),
    "server": Extra(("fastapi", "uvicorn", "multipart", "prometheus_client"), "requirements-server.txt", "server"),
    "corpus": Extra(("ray", "pyarrow"), "requirements-corpus.txt", "corpus"),
    "mic": Extra(("sounddevice", "websockets"), "requirements-mic.txt", "mic"),
    "diarize": Extra(("scipy", "sklearn", "umap"), "requirements-diarize.txt", "diarize"),
}
# python-multipart's newer module name; either one serves FastAPI's form parsing
_ALTERNATIVES = {"multipart": ("python_multipart",)}


class MissingRequirement(RuntimeError):
    """A module a script needs is not installed; the message is the one line to show."""


def _installed(module: str) -> bool:
    for name in (module, *_ALTERNATIVES.get(module, ())):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a broken or blocked package counts as missing
            continue
    return False


def install_command(extra: Extra) -> str:
    """The command that installs `extra`: its requirements file in a checkout (the path as seen from the
    current folder), else the pip extra of the installed distribution."""
    if CHECKOUT_DIR is not None and (CHECKOUT_DIR / extra.requirements).is_file():
        path = CHECKOUT_DIR / extra.requirements
        shown = extra.requirements if Path.cwd().resolve() == CHECKOUT_DIR else str(path)
        command = f"pip install -r {shown}"
    else:
        command = f'pip install "{DISTRIBUTION}[{extra.extra}]"' if extra.extra else f"pip install {DISTRIBUTION}"
    return f"{extra.before} && {command}" if extra.before else command


def message(script: str, module: str, extra: Extra) -> str:
    """The one line for a missing module: which, in which Python, what to run."""
    venv = CHECKOUT_DIR / ".venv" if CHECKOUT_DIR is not None else None
    in_venv = Path(sys.prefix).resolve() == venv.resolve() if venv is not None and venv.is_dir() else True
    where = "" if in_venv else f"run it in the project's environment (. {venv}/bin/activate), or "
    return (f"{script} needs the Python module {module!r}, which is not installed in {sys.executable}: "
            f"{where}install it with: {install_command(extra)}")


def check(script: str, *extras: str) -> None:
    """Raise MissingRequirement for the first module of `extras` (names of EXTRAS) that is not installed."""
    for name in extras:
        extra = EXTRAS[name]
        for module in extra.modules:
            if not _installed(module):
                raise MissingRequirement(message(script, module, extra))


def extra_of(module: str) -> Extra:
    """The requirements file a top-level module comes from (the base one when it is not listed)."""
    top = module.split(".", 1)[0]
    for extra in EXTRAS.values():
        if top in {name for m in extra.modules for name in (m, *_ALTERNATIVES.get(m, ()))}:
            return extra
    return EXTRAS["base"]


@contextlib.contextmanager
def guarded(script: str, *extras: str, argv: list[str] | None = None) -> Iterator[None]:
    """Run a command's body with its requirements checked first and a late missing module made one line.

    `argv`: the command's arguments (default: sys.argv[1:]); with -h/--help nothing is checked.
    Exits with 2 (SystemExit) after printing `error: ...` on stderr.
    """
    arguments = sys.argv[1:] if argv is None else argv
    try:
        if not {"-h", "--help"} & set(arguments):  # the help needs nothing installed but argparse
            check(script, *extras)
        yield
    except MissingRequirement as exc:
        _fail(str(exc))
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".", 1)[0] == "funasr_nano":
            raise  # the project's own code: a bug, keep the traceback
        _fail(message(script, exc.name.split(".", 1)[0], extra_of(exc.name)))


def _fail(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_SETUP)

