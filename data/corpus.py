"""Corpus sources behind one interface: ``iter_rows`` / ``iter_texts`` yield ``(doc_id, ...)``.

Sources (the ``--corpus`` value):

- ``stdlib``: the running interpreter's standard-library ``*.py`` files (without site-packages
  / dist-packages), sorted, one document per file, the path relative to the stdlib as id.
  Files are decoded as Python decodes them (PEP 263 coding declarations); the few test
  fixtures that Python itself cannot decode are skipped and counted (``--errors replace``
  keeps them with replacement characters).
- a file or a glob of ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files;
- a directory written by ``datasets.Dataset.save_to_disk``.

``.txt`` and ``.jsonl`` are read line by line here rather than through ``datasets``: that is
what gives stable per-file ids (``path`` or ``path:line``), errors naming the file and line,
``--skip-bad`` and ``--errors replace``, and constant memory for any size. ``.json``,
``.parquet``, ``.csv`` and saved datasets go through ``datasets`` (``load_dataset(fmt,
data_files=...)`` / ``load_from_disk``), with ``--streaming`` for corpora larger than memory;
their ids are ``<name>#<row>``. File ids are relative to the glob's fixed prefix (or the
file's directory), so the split does not depend on how the path was spelled.

``--group-by directory`` (stdlib and ``.txt`` files, one document per file) makes
repository-level documents: the files of one directory (not its subdirectories) become one
document, in path order, each preceded by :func:`file_header` of its relative path; the
document is exactly :func:`group_text` of its files and its id is the directory plus ``/``.
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import os
import posixpath
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtrain.model.errors import LongtrainError

FORMATS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
GROUP_BY = ("file", "directory")
FILE_HEADER = "=== {path} ===\n"
"""The line that opens every file inside a ``--group-by directory`` document."""


def file_header(path: str) -> str:
    """Header line of the file at ``path`` (relative, posix) inside a directory document."""
    return FILE_HEADER.format(path=path)


def group_text(files: Iterable[tuple[str, str]]) -> str:
    """One directory document: every ``(relative path, text)`` as its header then its text,
    concatenated with nothing added, so that decoding gives back exactly this string."""
    return "".join(file_header(path) + text for path, text in files)


@dataclass
class CorpusStats:
    """Counts gathered while reading, reported in the manifest."""

    bad_records: int = 0
    """Malformed records skipped under ``--skip-bad``."""
    first_bad: list[str] = field(default_factory=list)
    """``file:line: reason`` of the first few skipped records."""
    undecodable: list[str] = field(default_factory=list)
    """stdlib files skipped because Python itself cannot decode them."""


@dataclass
class CorpusSpec:
    """Where documents come from and how to read them (the ``--corpus`` family of options)."""

    source: str
    """``stdlib``, a file, a glob, or a ``save_to_disk`` directory."""
    text_field: str = "text"
    """Field holding the text in structured records."""
    txt_per_line: bool = False
    """``.txt``: one document per line instead of one per file."""
    streaming: bool = False
    """Stream ``datasets`` sources instead of loading them into the Arrow cache."""
    errors: str = "strict"
    """Non-UTF-8 bytes: ``strict`` stops naming the file, ``replace`` substitutes U+FFFD."""
    skip_bad: bool = False
    """Skip malformed records (counted) instead of stopping at the first."""
    group_by: str = "file"
    """``file``: a document per file or record; ``directory``: one per directory of files."""

    def __post_init__(self) -> None:
        if self.errors not in ("strict", "replace"):
            raise LongtrainError(f"--errors {self.errors}: choose strict or replace")
        if self.group_by not in GROUP_BY:
            raise LongtrainError(f"--group-by {self.group_by}: choose one of {', '.join(GROUP_BY)}")
        if self.group_by == "directory" and self.txt_per_line:
            raise LongtrainError(
                "--group-by directory with --txt-per-line: a directory document is made of "
                "whole files; drop one of the two"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CorpusSpec:
        """Build from the CLI's corpus options (absent options take their defaults)."""
        return cls(
            source=args.corpus,
            text_field=getattr(args, "text_field", "text"),
            txt_per_line=getattr(args, "txt_per_line", False),
            streaming=getattr(args, "streaming", False),
            errors=getattr(args, "errors", "strict"),
            skip_bad=getattr(args, "skip_bad", False),
            group_by=getattr(args, "group_by", None) or "file",
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests and tokenizer metadata."""
        d: dict[str, Any] = {"corpus": self.source}
        if self.source == "stdlib":
            d["stdlib_path"] = stdlib_root()
        d.update(text_field=self.text_field, txt_per_line=self.txt_per_line, errors=self.errors)
        # Only when not the default: data prepared before the option existed keeps its
        # fingerprint, so re-running its prepare still resumes or is a no-op.
        if self.group_by != "file":
            d["group_by"] = self.group_by
        return d


def stdlib_root() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[Path]:
    """Sorted ``*.py`` files of the stdlib, without third-party package directories."""
    root = Path(stdlib_root())
    skip = {"site-packages", "dist-packages"}
    return sorted(
        p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts)
    )


def _stdlib_text(path: Path, rel: str, spec: CorpusSpec, stats: CorpusStats) -> str | None:
    """A stdlib file decoded as Python decodes it; None (counted) for the undecodable ones."""
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        # Deliberately broken test fixtures (e.g. test/tokenizedata/badsyntax_pep3120.py).
        if spec.errors == "strict":
            stats.undecodable.append(rel)
            return None
        text = data.decode("utf-8", errors="replace")
    # A UTF-8 BOM is an encoding mark, not text (Python drops it when importing too).
    return text.removeprefix("\ufeff")


def _by_directory(rels: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``(directory, its files in path order)`` for relative posix paths, directories sorted.

    Collected first because a sorted file list interleaves a directory's files with its
    subdirectories' (``a/b/x`` sorts between ``a/a`` and ``a/c``).
    """
    groups: dict[str, list[str]] = {}
    for rel in rels:
        groups.setdefault(posixpath.dirname(rel) or ".", []).append(rel)
    return [(d, sorted(groups[d])) for d in sorted(groups)]


def _iter_stdlib(spec: CorpusSpec, stats: CorpusStats) -> Iterator[tuple[str, dict]]:
    root = Path(stdlib_root())
    files = {path.relative_to(root).as_posix(): path for path in stdlib_files()}
    if spec.group_by == "file":
        for rel, path in files.items():
            text = _stdlib_text(path, rel, spec, stats)
            if text is not None:
                yield rel, {"text": text}
        return
    for directory, rels in _by_directory(files):
        texts = ((rel, _stdlib_text(files[rel], rel, spec, stats)) for rel in rels)
        yield f"{directory}/", {"text": group_text((r, t) for r, t in texts if t is not None)}


def _decode(data: bytes, where: str, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise LongtrainError(
            f"{where}: byte {e.start} is not UTF-8 ({data[e.start : e.start + 4]!r}); convert "
            "the file to UTF-8 or pass --errors replace"
        ) from None


def id_base(source: str) -> str:
    """Directory that document ids are relative to: the glob's fixed prefix, or the file's
    directory. Ids then do not depend on how the path was spelled (relative, absolute), so
    the train/val split of a corpus is the same from any working directory."""
    if glob.has_magic(source):
        parts = Path(source).parts
        fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
        return str(Path(*fixed)) if fixed else "."
    return os.path.dirname(source) or "."


def _rel(f: str, base: str) -> str:
    return Path(os.path.relpath(f, base)).as_posix()


def _iter_txt(files: list[str], spec: CorpusSpec) -> Iterator[tuple[str, dict]]:
    base = id_base(spec.source)
    if spec.group_by == "directory":
        by_rel = {_rel(f, base): f for f in files}
        for directory, rels in _by_directory(by_rel):
            texts = (
                (rel, _decode(Path(by_rel[rel]).read_bytes(), by_rel[rel], spec.errors))
                for rel in rels
            )
            yield f"{directory}/", {"text": group_text(texts)}
        return
    for f in files:
        if not spec.txt_per_line:
            yield _rel(f, base), {"text": _decode(Path(f).read_bytes(), f, spec.errors)}
            continue
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw, f"{f}:{lineno}", spec.errors).rstrip("\r\n")
                yield f"{_rel(f, base)}:{lineno}", {"text": line}


def _iter_jsonl(
    files: list[str], spec: CorpusSpec, stats: CorpusStats
) -> Iterator[tuple[str, dict]]:
    base = id_base(spec.source)
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{f}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    row = json.loads(_decode(raw, where, spec.errors))
                    if not isinstance(row, dict):
                        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                except (json.JSONDecodeError, ValueError) as e:
                    if not spec.skip_bad:
                        raise LongtrainError(
                            f"{where}: malformed JSONL record ({e}); fix the line or pass --skip-bad"
                        ) from None
                    stats.bad_records += 1
                    if len(stats.first_bad) < 10:
                        stats.first_bad.append(f"{where}: {e}")
                    continue
                yield f"{_rel(f, base)}:{lineno}", row


def _iter_datasets(ds: Any, name: str) -> Iterator[tuple[str, dict]]:
    # Ids use the source's last path component, for the same reason as id_base.
    short = Path(name.rstrip("/")).name or name
    try:
        for i, row in enumerate(ds):
            yield f"{short}#{i}", row
    except LongtrainError:
        raise
    except Exception as e:  # datasets wraps reader errors in several exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LongtrainError(f"{name}: cannot read ({msg}); check the file format") from None


def _load_saved(path: str, spec: CorpusSpec) -> Any:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise LongtrainError(
                f"{path}: a DatasetDict with splits {sorted(ds)}; pass one split's directory "
                f"({path}/<split>)"
            )
        ds = ds["train"]
    return ds.to_iterable_dataset() if spec.streaming else ds


def resolve_files(source: str) -> list[str]:
    """Files matched by a path or glob, sorted; one clear error when there are none."""
    files = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise LongtrainError(
            f"--corpus {source}: no such file or no file matches; give 'stdlib', a file, a glob, "
            "or a directory written by datasets.save_to_disk"
        )
    exts = {Path(f).suffix.lower() for f in files}
    unknown = exts - FORMATS.keys()
    if unknown or len(exts) > 1:
        raise LongtrainError(
            f"--corpus {source}: extensions {sorted(exts)}; use files of one format among "
            f"{sorted(FORMATS)}"
        )
    return files


def _check_grouping(spec: CorpusSpec, what: str) -> None:
    if spec.group_by == "directory":
        raise LongtrainError(
            f"--group-by directory: --corpus {spec.source} holds {what}; directory documents "
            "need one document per file: pass 'stdlib' or .txt files, or drop --group-by"
        )


def iter_rows(spec: CorpusSpec, stats: CorpusStats | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(doc_id, record)`` for every record of the source, in a deterministic order."""
    stats = stats if stats is not None else CorpusStats()
    src = spec.source
    if src == "stdlib":
        yield from _iter_stdlib(spec, stats)
        return
    if os.path.isdir(src):
        _check_grouping(spec, "a datasets.save_to_disk directory")
        if not (
            os.path.exists(os.path.join(src, "state.json"))
            or os.path.exists(os.path.join(src, "dataset_dict.json"))
        ):
            raise LongtrainError(
                f"--corpus {src}: a directory not written by datasets.save_to_disk; pass a glob "
                f"such as '{src}/*.jsonl'"
            )
        yield from _iter_datasets(_load_saved(src, spec), src)
        return
    files = resolve_files(src)
    fmt = FORMATS[Path(files[0]).suffix.lower()]
    if fmt != "text":
        _check_grouping(spec, f"{fmt} records")
    if fmt == "text":
        yield from _iter_txt(files, spec)
    elif fmt == "jsonl":
        yield from _iter_jsonl(files, spec, stats)
    else:
        import datasets

        try:
            ds = datasets.load_dataset(
                fmt, data_files=files, split="train", streaming=spec.streaming
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LongtrainError(f"--corpus {src}: cannot read as {fmt} ({msg})") from None
        yield from _iter_datasets(ds, src)


def record_text(doc_id: str, row: dict, text_field: str) -> str:
    """The text of one record; a missing or non-string field is one clear error."""
    if text_field not in row:
        raise LongtrainError(
            f"{doc_id}: no field '{text_field}'; fields present: {', '.join(map(str, row)) or '(none)'}; "
            "pass --text-field NAME"
        )
    value = row[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LongtrainError(
            f"{doc_id}: field '{text_field}' is {type(value).__name__}, expected a string; "
            "pass --text-field with a text column"
        )
    return value


def iter_texts(spec: CorpusSpec, stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)``; see :func:`iter_rows`."""
    for doc_id, row in iter_rows(spec, stats):
        yield doc_id, record_text(doc_id, row, spec.text_field)
