"""Built-in corpora that need no download and ship no data: English text every Python installation has.

`builtin:pydoc` is the pydoc help topics (~0.5 MB), `builtin:stdlib` the docstrings of the standard
library's pure-Python modules (read with `ast`, nothing imported; ~1.6 MB); they do not overlap. The text
depends only on the Python version: topics and modules come in sorted order."""

from __future__ import annotations

import ast
import sysconfig
from functools import lru_cache
from pathlib import Path

from mobilellm.errors import MobileLLMError

BUILTIN_CORPORA = ("pydoc", "stdlib")
# Test suites and tools, not documentation; their docstrings are mostly noise.
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def builtin_documents(name: str = "pydoc") -> list[str]:
    """The documents of a built-in corpus, in a fixed order."""
    if name == "pydoc":
        return list(_pydoc_topics())
    if name == "stdlib":
        return list(_stdlib_docstrings())
    raise MobileLLMError(f"unknown built-in corpus {name!r}; choose from "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA))


@lru_cache(maxsize=1)
def _pydoc_topics() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the docs out of the base Python package
        raise MobileLLMError("this Python installation lacks pydoc_data (the built-in help text); install the "
                             "full Python package or pass your own --input files") from None
    return tuple(topics[key] for key in sorted(topics))


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[str, ...]:
    return module_docstrings(Path(sysconfig.get_paths()["stdlib"]))


def module_docstrings(root: Path) -> tuple[str, ...]:
    """One document per .py file under root: its module, class and function docstrings, sorted by path."""
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_PARTS or part.startswith(".") for part in rel):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        parts = [ast.get_docstring(tree)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                parts.append(ast.get_docstring(node))
        text = "\n\n".join(p for p in parts if p)
        if text.strip():
            docs.append(text)
    return tuple(docs)
