"""Prompt prefixes' KV cells on disk, so that a fresh process skips the prefix's pass.

Every prompt begins with the same text for the same options (system turn and task), and that
text goes into the cache in a pass of its own (`funasr_nano.decoding.prefixes`): 20 positions, 106 ms
for the full-size q8_0 GGUF on 2 cores. Within a process the prefix cache reuses it; but a CLI run
on one file is a new process each time. llama.cpp hands out one sequence's cells as bytes and
takes them back (`llama_state_seq_get_data` / `set_data`: 2.3 MB for that prefix, about 1 ms each
way), so the first process to decode a prefix writes its cells to a file and later ones load
them. The bytes are what that pass computed, so a loaded prefix gives every later row the bits a
decoded one gives (tested); the key makes sure they come from the same weights, llama.cpp build,
CPU features and cache settings.

Where: `.prompt-cache/` beside the GGUF; where that cannot be written, the user's cache folder
(`$XDG_CACHE_HOME/funasr-nano/prompts`, one sub-folder per model folder); where neither can, no
store. A file whose checksum fails, or whose cells llama.cpp refuses, is deleted and the prefix
decoded again; the 32 most recently used files of a GGUF are kept, older ones deleted (every new
hotword list is a new prefix). FUNASR_PROMPT_CACHE=0 switches it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from funasr_nano.models.session_cache import shared_cache_folder

log = logging.getLogger(__name__)

STORE_FOLDER = ".prompt-cache"
STORE_ENV = "FUNASR_PROMPT_CACHE"
_KEY_LEN = 24
_DIGEST_LEN = 32  # each file: sha256 of the cells, then the cells
MAX_FILES = 32  # per GGUF and folder (2.3 MB each for the full model's default prefix)


def store_enabled() -> bool:
    return os.environ.get(STORE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class PrefixStore:
    """Files of saved prefix cells for one GGUF and one set of context settings (`signature`)."""

    def __init__(self, gguf: Path, signature: str, folders: list[Path] | None = None) -> None:
        self.gguf = Path(gguf)
        st = self.gguf.stat()
        self._base = "\n".join([signature, str(st.st_size), str(st.st_mtime_ns)])
        self.folders = folders if folders is not None else [self.gguf.parent / STORE_FOLDER,
                                                            shared_cache_folder(self.gguf, "prompts")]

    @classmethod
    def for_decoder(cls, decoder) -> PrefixStore | None:  # noqa: ANN001 - a LlamaDecoder
        """The store of a loaded decoder, or None when switched off."""
        if not store_enabled():
            return None
        return cls(decoder.path, decoder.state_signature())

    def _name(self, ids: Sequence[int], folder_index: int) -> str:
        items = [self._base, ",".join(map(str, ids))]
        if folder_index:  # a shared folder: the path tells two model folders apart
            items.append(str(self.gguf.resolve()))
        return f"{self.gguf.stem}.{hashlib.sha256(chr(10).join(items).encode()).hexdigest()[:_KEY_LEN]}.kv"

    def _files(self, ids: Sequence[int]) -> list[Path]:
        return [folder / self._name(ids, i) for i, folder in enumerate(self.folders)]

    def load(self, ids: Sequence[int]) -> bytes | None:
        """The saved cells of the prefix `ids`, or None; a file whose checksum fails is deleted."""
        for path in self._files(ids):
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            digest, data = raw[:_DIGEST_LEN], raw[_DIGEST_LEN:]
            if hashlib.sha256(data).digest() == digest:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: the last to be evicted
                return data
            log.debug("%s: damaged prefix file, deleted", path)
            path.unlink(missing_ok=True)
        return None

    def save(self, ids: Sequence[int], data: bytes) -> None:
        """Write the cells of `ids` into the first writable folder (a complete file or none)."""
        for path in self._files(ids):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            except OSError as exc:
                log.debug("%s: prompt cache folder not writable (%s)", path.parent, exc)
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(hashlib.sha256(data).digest())  # what llama.cpp reads is never a torn or damaged file
                    f.write(data)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of a shared model folder
                os.replace(tmp, path)
                log.debug("%s: prefix of %d positions saved", path, len(ids))
                self._evict(path.parent)
                return
            except OSError as exc:
                log.debug("%s: cannot write the prefix (%s)", path, exc)
                Path(tmp).unlink(missing_ok=True)
        log.debug("%s: no writable prompt cache folder", self.gguf)

    def _evict(self, folder: Path) -> None:
        """Keep the MAX_FILES most recently used files of this GGUF: a server meets a new prefix for
        every new hotword list, and the disk must not fill with them."""
        files = []
        for path in folder.glob(f"{self.gguf.stem}.*.kv"):
            with contextlib.suppress(OSError):
                files.append((path.stat().st_mtime_ns, path))
        for _, path in sorted(files, reverse=True)[MAX_FILES:]:
            path.unlink(missing_ok=True)

    def discard(self, ids: Sequence[int]) -> None:
        """Delete the files of `ids` (llama.cpp refused what they hold)."""
        for path in self._files(ids):
            path.unlink(missing_ok=True)
