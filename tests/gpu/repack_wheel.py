"""Repack a llama-cpp-python wheel built by tests/gpu/build_wheel.sh: what a load reads, nothing else.

- a wheel cannot hold symlinks, so scikit-build-core's wheel holds each library 6 times (CMake's
  install tree in lib/ and the package's llama_cpp/lib/, under 3 names each): only the names
  llama_cpp's ctypes loader opens (libllama.so, libggml.so, libmtmd.so) and the sonames they need
  (readelf's NEEDED, followed) stay;
- debug symbols stripped;
- RUNPATH cut to `$ORIGIN`: CMake adds the folders it linked from (the cuBLAS wheel's, in this
  machine's cache), so the libraries would find cuBLAS here whatever LD_LIBRARY_PATH says, and the
  check here (tests/gpu/wheel_check.py) would not be the check on the GPU machine;
- RECORD rewritten for the changed files.

usage: python tests/gpu/repack_wheel.py IN.whl OUT.whl   (IN may be a wheel this script wrote)
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile


def repack(src: str, dst: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as zin:
        root = pathlib.Path(tmp)
        zin.extractall(root)
        for extra in ("lib", "include", "bin"):  # CMake's own install tree, not read by the package
            shutil.rmtree(root / extra, ignore_errors=True)
        libdir = root / "llama_cpp" / "lib"
        keep, todo = set(), ["libllama.so", "libggml.so", "libmtmd.so"]  # what llama_cpp's ctypes loads
        while todo:
            name = todo.pop()
            if name in keep or not (libdir / name).is_file():
                continue
            keep.add(name)
            dyn = subprocess.run(["readelf", "-d", str(libdir / name)], capture_output=True, text=True, check=True).stdout
            todo += re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)
        for path in libdir.iterdir():
            if path.name not in keep:
                path.unlink()
                continue
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
            # RUNPATH: only $ORIGIN. CMake adds the folders it linked from (here the cuBLAS wheel's, in this
            # machine's cache), so the libraries would find cuBLAS here whatever LD_LIBRARY_PATH says, and
            # the check here would not be the check there. The string is cut short in place (same length).
            dyn = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
            found = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.+?)\]", dyn)
            if found and found.group(1) != "$ORIGIN":
                old = found.group(1).encode() + b"\0"
                data = path.read_bytes()
                if data.count(old) != 1 or not old.startswith(b"$ORIGIN"):
                    sys.exit(f"{path.name}: cannot cut RUNPATH {found.group(1)!r}")
                path.write_bytes(data.replace(old, b"$ORIGIN".ljust(len(old), b"\0")))
            dyn = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
            if re.search(r"Library (?:runpath|rpath): \[(?!\$ORIGIN\]).*\]", dyn):
                sys.exit(f"{path.name}: RUNPATH is not $ORIGIN alone")
        rec = next(root.glob("*.dist-info/RECORD"))
        rows = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if path == rec:
                rows.append((rel, "", ""))
                continue
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append((rel, f"sha256={digest}", str(len(data))))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        rec.write_text(buf.getvalue())
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                zout.write(path, path.relative_to(root).as_posix())
        print("kept:", " ".join(sorted(keep)), file=sys.stderr)


if __name__ == "__main__":
    repack(*sys.argv[1:3])
