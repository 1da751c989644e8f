"""The embedded text corpus: docstrings of CPython's own pure-Python standard library.

The text is CPython's standard-library docstrings, Copyright (c) Python Software Foundation,
distributed under the PSF License Agreement (https://docs.python.org/3/license.html); it ships
with every Python install, so the corpus is offline and needs no download.

How it is built (deterministic for a given Python version):

* every ``.py`` file under the running interpreter's stdlib folder, in sorted path order,
  skipping tests, GUI/IDE code, bundled wheels and third-party packages (``SKIP_DIRS``);
* each file is *parsed* with ``ast`` (never imported) and its module, class and function
  docstrings are collected in source order (``ast.get_docstring``, cleaned/dedented);
* one document per module: its docstrings joined by blank lines;
* a document goes to the held-out split when the sha256 of its relative path falls in a
  1-in-20 bucket (about 5%; salted, see ``HELDOUT_SALT``), so the split is by document and
  never leaks text.

Nothing is written to disk unless the caller passes ``cache_dir``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Any path component equal to one of these excludes the file.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "ensurepip",
        "__pycache__",
        "lib-dynload",
        "pydoc_data",
        "__phello__",
        "venv",
        "encodings",  # ~100 generated codec modules with near-identical boilerplate docstrings
    }
)
SKIP_PREFIXES = ("config-", "_sysconfigdata", "test_")
HELDOUT_BUCKETS = 20  # 1 in 20 documents (~5%) goes to the held-out split
HELDOUT_SALT = "heldout"  # hashed before the path (gives ~5% of the characters on CPython 3.11)
DOC_SEPARATOR = "\n\n\n"
FORMAT_VERSION = 1  # bump when the extraction rules change


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib folder, posix separators
    text: str

    @property
    def heldout(self) -> bool:
        return is_heldout(self.path)


@dataclass(frozen=True)
class Corpus:
    train_docs: tuple[Document, ...]
    heldout_docs: tuple[Document, ...]
    python_version: str
    sha256: str  # over every document (path and text), both splits
    train_text: str = field(repr=False, default="")
    heldout_text: str = field(repr=False, default="")

    @property
    def n_train_docs(self) -> int:
        return len(self.train_docs)

    @property
    def n_heldout_docs(self) -> int:
        return len(self.heldout_docs)

    @property
    def n_docs(self) -> int:
        return self.n_train_docs + self.n_heldout_docs

    def summary(self) -> dict:
        return {
            "python_version": self.python_version,
            "sha256": self.sha256,
            "train_docs": self.n_train_docs,
            "heldout_docs": self.n_heldout_docs,
            "train_chars": len(self.train_text),
            "heldout_chars": len(self.heldout_text),
        }


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256((HELDOUT_SALT + rel_path).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def _skipped(rel: Path) -> bool:
    return any(part in SKIP_DIRS or part.startswith(SKIP_PREFIXES) for part in rel.parts)


def source_files(root: Path | None = None) -> list[Path]:
    """The stdlib .py files that feed the corpus, sorted by relative posix path."""
    root = Path(root) if root is not None else stdlib_dir()
    files = [p for p in root.rglob("*.py") if p.is_file() and not _skipped(p.relative_to(root))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(node: ast.AST):
    """Docstrings of `node` and of the classes/functions nested in it, in source order."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def module_document(path: Path, root: Path) -> Document | None:
    rel = path.relative_to(root).as_posix()
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in old modules
            tree = ast.parse(source, filename=rel)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None
    docs = list(_docstrings(tree))
    if not docs:
        return None
    return Document(rel, "\n\n".join(docs))


def build_corpus(root: Path | None = None) -> Corpus:
    root = Path(root) if root is not None else stdlib_dir()
    train, heldout = [], []
    h = hashlib.sha256()
    for path in source_files(root):
        doc = module_document(path, root)
        if doc is None:
            continue
        for part in (doc.path, doc.text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
        (heldout if doc.heldout else train).append(doc)
    return Corpus(
        train_docs=tuple(train),
        heldout_docs=tuple(heldout),
        python_version=python_version(),
        sha256=h.hexdigest(),
        train_text=DOC_SEPARATOR.join(d.text for d in train),
        heldout_text=DOC_SEPARATOR.join(d.text for d in heldout),
    )


def python_version() -> str:
    return "%d.%d.%d" % sys.version_info[:3]


def _cache_file(cache_dir: Path, root: Path) -> Path:
    key = hashlib.sha256(f"{FORMAT_VERSION}|{python_version()}|{root}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"corpus-{key}.json"


@functools.lru_cache(maxsize=4)
def _load_in_memory(root: str) -> Corpus:
    return build_corpus(Path(root))


def load_corpus(cache_dir: str | Path | None = None, root: str | Path | None = None) -> Corpus:
    """The corpus of this interpreter's stdlib docstrings (memoized in-process).

    `cache_dir`: optional folder for a JSON copy, reused by later processes. `root`: another
    stdlib folder to read (default: the running interpreter's).
    """
    root_path = Path(root) if root is not None else stdlib_dir()
    if cache_dir is None:
        return _load_in_memory(str(root_path))
    cache = _cache_file(Path(cache_dir), root_path)
    if cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            train = tuple(Document(p, t) for p, t in data["train"])
            heldout = tuple(Document(p, t) for p, t in data["heldout"])
            return Corpus(
                train,
                heldout,
                data["python_version"],
                data["sha256"],
                DOC_SEPARATOR.join(d.text for d in train),
                DOC_SEPARATOR.join(d.text for d in heldout),
            )
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache is rebuilt
    corpus = _load_in_memory(str(root_path))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "python_version": corpus.python_version,
                "sha256": corpus.sha256,
                "train": [[d.path, d.text] for d in corpus.train_docs],
                "heldout": [[d.path, d.text] for d in corpus.heldout_docs],
            }
        ),
        encoding="utf-8",
    )
    tmp.replace(cache)
    return corpus
