"""Sentencepiece BPE tokenizer: training, loading, special tokens, chat template, HF export.

The model is trained so that ``decode(encode(text)) == text`` for any Unicode text, including
source code: identity normalisation, no dummy prefix, whitespace kept as is (runs of spaces
become whitespace-only pieces), digits split, and byte fallback for anything the vocabulary does
not cover. ``encode`` never adds BOS/EOS; packing puts EOS after each document.

Special ids are fixed: 0 ``<|unk|>`` (never produced, thanks to byte fallback), 1 ``<|bos|>``,
2 ``<|eos|>``, 3 ``<|pad|>``, then the chat markers ``<|system|>``, ``<|user|>``,
``<|assistant|>``, ``<|end|>`` as user-defined symbols. The markers are user-defined (matched
in text) rather than control symbols because the Hugging Face tokenizer matches every special
token in text; making sentencepiece do the same keeps both tokenizers giving identical ids.
The names are bracketed with ``<|...|>`` so that ordinary text (HTML ``<s>``, ``<unk>``) is
never mistaken for a special token by either tokenizer.

A tokenizer directory holds ``tokenizer.model`` and ``tokenizer_meta.json`` (special ids,
vocabulary size, the sha256 of ``tokenizer.model`` as ``hash``, how it was trained).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from longtrain.model.errors import LongtrainError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer_meta.json"
UNK, BOS, EOS, PAD = "<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_MARKERS = {role: f"<|{role}|>" for role in ROLES}
USER_SYMBOLS = [*ROLE_MARKERS.values(), END]
SPACE_MARK = "\u2581"  # sentencepiece's whitespace symbol

# One message is `<|role|>` + content + `<|end|>`, no separators, no BOS: exactly the ids that
# longtrain.data.sft.encode_chat builds, so that apply_chat_template matches training data.
# EOS is not part of the template: packing adds it after every record, as for pretraining.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(directory: str | os.PathLike, option: str = "--tokenizer") -> str:
    """The hash a tokenizer directory records (``tokenizer_meta.json``), or one clear error.

    Only the recorded hash is read; :meth:`Tokenizer.load` also checks it against the model.
    """
    meta = Path(directory) / META_FILE
    if not meta.is_file():
        raise LongtrainError(
            f"{option} {directory}: no {META_FILE}; pass a directory written by "
            "`longtrain tokenizer`"
        )
    try:
        return str(json.loads(meta.read_text()).get("hash", ""))
    except json.JSONDecodeError as e:
        raise LongtrainError(f"{meta}: invalid JSON ({e}); re-run `longtrain tokenizer`") from None


def check_tokenizer_hash(want: str | None, have: str | None, want_what: str, have_what: str,
                         fix: str) -> None:  # fmt: skip
    """The one tokenizer-identity rule: ``have`` must equal ``want``; the error names both.

    ``want_what`` / ``have_what`` say whose hashes they are (``"the data in data.dir D"``,
    ``"data.tokenizer T"``); ``fix`` says what to do instead.
    """
    if want and have and want != have:
        raise LongtrainError(
            f"{have_what} (tokenizer hash {have[:12]}) differs from the tokenizer of "
            f"{want_what} (hash {want[:12]}); {fix}"
        )


class Tokenizer:
    """A trained sentencepiece model plus the special ids the rest of longtrain uses."""

    def __init__(self, model_bytes: bytes, meta: dict) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.meta = meta
        self.hash: str = meta["hash"]
        self.vocab_size: int = self.sp.get_piece_size()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        #: role name -> id of its marker, e.g. ``{"user": 5, ...}``
        self.role_ids: dict[str, int] = {r: self.sp.piece_to_id(m) for r, m in ROLE_MARKERS.items()}
        self.end_id: int = self.sp.piece_to_id(END)
        self._mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a directory written by :func:`train_tokenizer`, checking the model's hash."""
        d = Path(directory)
        model, meta_path = d / MODEL_FILE, d / META_FILE
        for p in (model, meta_path):
            if not p.is_file():
                raise LongtrainError(
                    f"{p}: not found; --tokenizer must be a directory written by "
                    "`longtrain tokenizer`"
                )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise LongtrainError(
                f"{meta_path}: invalid JSON ({e}); re-run `longtrain tokenizer`"
            ) from None
        data = model.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if meta.get("hash") != digest:
            raise LongtrainError(
                f"{model}: sha256 {digest[:12]} does not match hash {str(meta.get('hash'))[:12]} "
                f"in {meta_path}; the model file was replaced, re-run `longtrain tokenizer`"
            )
        return cls(data, meta)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added.

        U+2581 is sentencepiece's own whitespace mark and would decode as a space, so a
        literal one is emitted as its three byte-fallback tokens instead (both sentencepiece
        and the HF tokenizer decode those back to U+2581).
        """
        if SPACE_MARK not in text:
            return self.sp.encode(text, out_type=int)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids += self._mark_ids
            if part:
                ids += self.sp.encode(part, out_type=int)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (single-threaded: parallelism lives in prepare)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the exact inverse of :meth:`encode`."""
        return self.sp.decode([int(i) for i in ids])


def _doc_lines(text: str) -> Iterator[str]:
    # Sentencepiece trains on "sentences"; for source code that means lines. Newlines
    # themselves are covered by byte fallback (<0x0A>), as in Llama.
    for line in text.split("\n"):
        if line.strip():
            yield line


def train_tokenizer(
    documents: Iterable[tuple[str, str]],
    out_dir: str | os.PathLike,
    vocab_size: int = 8000,
    sample_mb: float = 64.0,
    seed: int = 0,
    source: str = "",
    num_threads: int | None = None,
    progress: bool = True,
) -> Tokenizer:
    """Train a BPE model on at most ``sample_mb`` MB of ``documents`` and write it to ``out_dir``.

    The sample is deterministic: documents are ordered by a seeded hash of their id and taken
    until the byte budget is reached, so the same corpus and seed give the same tokenizer.
    """
    if vocab_size < 300:
        raise LongtrainError(
            f"--vocab-size {vocab_size}: must be at least 300 (256 byte-fallback pieces + "
            f"{4 + len(USER_SYMBOLS)} special tokens + merges)"
        )
    if sample_mb <= 0:
        raise LongtrainError(f"--sample-mb {sample_mb}: must be positive")
    budget = int(sample_mb * 1e6)
    # Keep the documents with the smallest seeded hash of their id until the byte budget is
    # met: deterministic, independent of corpus order, and streaming (a bounded max-heap).
    key = f"{seed}:".encode()
    heap: list[tuple[int, str, str, int]] = []  # (-rank, id, text, nbytes)
    held = n_docs = 0
    for doc_id, text in tqdm(documents, desc="sampling corpus", unit="doc", disable=not progress):
        n_docs += 1
        rank = int.from_bytes(hashlib.sha256(key + doc_id.encode()).digest()[:8], "big")
        size = len(text.encode("utf-8"))
        heapq.heappush(heap, (-rank, doc_id, text, size))
        held += size
        while heap and held - heap[0][3] >= budget:
            held -= heapq.heappop(heap)[3]
    if not n_docs:
        raise LongtrainError("--corpus: no documents found; check the path or glob")
    lines: list[str] = []
    used = 0
    for _rank, _doc_id, text, size in sorted(heap, reverse=True):
        lines.extend(_doc_lines(text))
        used += size
    if not lines:
        raise LongtrainError("--corpus: all documents are empty; nothing to train on")
    random.Random(seed).shuffle(lines)
    print(
        f"training sentencepiece BPE: vocab {vocab_size}, {used / 1e6:.1f} MB, {len(lines)} lines"
    )
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9999,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            user_defined_symbols=USER_SYMBOLS,
            input_sentence_size=len(lines),
            shuffle_input_sentence=False,  # already shuffled with our seed
            max_sentence_length=16384,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise LongtrainError(f"sentencepiece training failed: {e}") from e
    data = buf.getvalue()
    meta = {
        "vocab_size": vocab_size,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "special_tokens": {UNK: 0, BOS: 1, EOS: 2, PAD: 3},
        "hash": hashlib.sha256(data).hexdigest(),
        "source": source,
        "sample_mb": sample_mb,
        "sample_bytes": used,
        "seed": seed,
        "chat_template": CHAT_TEMPLATE,
    }
    tok = Tokenizer(data, meta)
    meta["special_tokens"].update({m: tok.sp.piece_to_id(m) for m in USER_SYMBOLS})
    write_tokenizer_dir(data, meta, out_dir)
    return tok


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_tokenizer_dir(model_bytes: bytes, meta: dict, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer.model`` and ``tokenizer_meta.json`` (each via a temp name)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / MODEL_FILE, model_bytes)
    _atomic_write(d / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> Tokenizer:
    """Copy a tokenizer directory (validated by loading it) to ``dst``."""
    tok = Tokenizer.load(src)
    write_tokenizer_dir((Path(src) / MODEL_FILE).read_bytes(), tok.meta, dst)
    return tok


def save_hf_tokenizer(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write Hugging Face tokenizer files that give the same ids as :class:`Tokenizer`.

    ``AutoTokenizer.from_pretrained(out_dir)`` then loads a fast ``LlamaTokenizer`` from
    ``tokenizer.json`` with no extra code: no BOS/EOS added on encode, no prefix space (the
    model has no dummy prefix), the chat markers as special tokens, and the chat template.
    transformers converts ``tokenizer.model`` only when ``protobuf`` is installed; without it
    the conversion silently yields an empty vocabulary, so the result is checked here.
    The one known difference: text containing a literal U+2581 (sentencepiece's space mark),
    which :meth:`Tokenizer.encode` spells in byte tokens so it round-trips; the HF tokenizer
    decodes those ids exactly, but its own encoding of such text reads U+2581 as a space.
    """
    from transformers import LlamaTokenizer

    tok = Tokenizer.load(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(Path(tokenizer_dir) / MODEL_FILE, Path(tmp) / MODEL_FILE)
        hf = LlamaTokenizer.from_pretrained(
            tmp,
            add_prefix_space=False,
            add_bos_token=False,
            add_eos_token=False,
            legacy=False,
            unk_token=UNK,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            clean_up_tokenization_spaces=False,
        )
    if len(hf) != tok.vocab_size:
        raise LongtrainError(
            f"{tokenizer_dir}: transformers converted {len(hf)} of {tok.vocab_size} pieces; "
            "install protobuf (`pip install protobuf`) so it can read tokenizer.model"
        )
    probe = "def f(x):\n    return x  # ok\n"
    if hf.encode(probe, add_special_tokens=False) != tok.encode(probe):
        raise LongtrainError(
            f"{tokenizer_dir}: the transformers tokenizer disagrees with sentencepiece on a "
            "probe string; check the transformers version (tested with 5.24)"
        )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    # transformers 5 keeps the template in chat_template.jinja; older readers look in
    # tokenizer_config.json, and 4.x LlamaTokenizerFast adds BOS unless told otherwise.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, add_bos_token=False, add_eos_token=False)
    for key in ("is_local", "local_files_only"):  # describe this process, not the files
        cfg.pop(key, None)
    _atomic_write(cfg_path, (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode())


def cli_tokenizer(args: argparse.Namespace) -> int:
    """``longtrain tokenizer``: train on ``--corpus`` and write ``--out``."""
    from longtrain.data.corpus import CorpusSpec, iter_texts

    spec = CorpusSpec.from_args(args)
    tok = train_tokenizer(
        iter_texts(spec),
        args.out,
        vocab_size=args.vocab_size,
        sample_mb=args.sample_mb,
        seed=args.seed,
        source=spec.describe(),
    )
    print(f"wrote {Path(args.out) / MODEL_FILE} (vocab {tok.vocab_size}, hash {tok.hash[:12]})")
    return 0
