"""A real document stream made on the spot: paragraphs of the Python standard library's docs.

Nothing third-party is shipped: the texts are the docstrings of the interpreter that runs the
demo. ``python -m tooling.demo.corpus --count 50`` prints a sample as JSON lines.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

MODULES = [
    "abc",
    "argparse",
    "array",
    "asyncio",
    "base64",
    "binascii",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "contextlib",
    "contextvars",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "getpass",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "lzma",
    "math",
    "mimetypes",
    "multiprocessing",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "select",
    "selectors",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "traceback",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
]

_WORD = re.compile(r"[A-Za-z]{2,}")


def _paragraphs(doc: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "$ ")) for ln in lines):
            continue
        text = " ".join(lines)
        words = _WORD.findall(text)
        if len(words) < 12 or sum(c in "{}[]()=_<>" for c in text) > len(text) / 12:
            continue
        yield text


def _members(module: Any) -> Iterator[tuple[str, Any]]:
    yield module.__name__, module
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    if not mname.startswith("_") and callable(member):
                        yield f"{module.__name__}.{name}.{mname}", member


def stdlib_documents(limit: int | None = None) -> Iterator[dict[str, str]]:
    """Documents ``{"id", "title", "body", "module"}``, in a stable order."""
    seen: set[str] = set()
    count = 0
    for modname in MODULES:
        try:
            module = importlib.import_module(modname)
        except Exception:  # a module missing from this build of Python
            continue
        for qualname, obj in _members(module):
            doc = inspect.getdoc(obj) or ""
            for i, para in enumerate(_paragraphs(doc)):
                if para in seen:
                    continue
                seen.add(para)
                yield {"id": f"{qualname}#{i}", "title": qualname, "body": para, "module": modname}
                count += 1
                if limit is not None and count >= limit:
                    return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args(argv)
    for document in stdlib_documents(args.count):
        sys.stdout.write(json.dumps(document) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
