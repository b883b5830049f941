"""
Prepare a token dataset for training, and read it back during training.

    python prepare_data.py                              # stdlib sources, offline (data/local)
    python prepare_data.py --include-site-packages      # + installed packages (data/local-site)
    python prepare_data.py --source fineweb-edu --shards 4   # GPT-2 tokens from the HF hub
    python prepare_data.py --source my_texts/           # your own .txt/.md/.jsonl

train.py and sweep.sh build the offline corpora they need (data/demo, data/local,
data/local-site, data/midi: EMBEDDED below) themselves when they are missing.

How data flows:
  documents (source files, text, or downloaded shards)
    -> deduplicated, each assigned to train or val by a hash of its group
       (top-level package / project), so near-copies never straddle the split
    -> BPE tokenizer trained on the train split (rustbpe), saved in tiktoken format
    -> tokens, each document preceded by <|endoftext|>, written as llm.c-style
       .bin shards (256 int32 header: magic, version, token count; then uint16)
    -> meta.json (counts, checksums, tokenizer, the command), written last.

train.py reads the result with TrainLoader / val_batches below: shards are
memory-mapped and cut into non-overlapping windows of seq_len+1 tokens; step t
takes windows [t*R, (t+1)*R) of a seeded per-epoch permutation, so the data a
step sees depends only on (seed, step), not on the number of GPUs or batch split.
This module must not import torch.
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
from pathlib import Path

import numpy as np
import tiktoken

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = "<|endoftext|>"

DEFAULT_VOCAB_SIZE = 8192         # CPU-demo size; 32768 is the paper-like setting
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SHARD_TOKENS = 100_000_000
GPT2_VOCAB_SIZE = 50257           # 50256 merges + <|endoftext|>
HF_BASE = "https://huggingface.co/datasets/kjj0/{repo}/resolve/main"
REMOTE_SOURCES = {  # source -> (hub repo, file prefix)
    "fineweb-edu": ("finewebedu10B-gpt2", "finewebedu"),
    "fineweb": ("fineweb10B-gpt2", "fineweb"),
}
BASE_URL_ENV = "PREPARE_DATA_BASE_URL"
REPO_DIR = Path(__file__).resolve().parent


class DataError(Exception):
    """A problem with the data or the input; the message is one line and names the file."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


# -----------------------------------------------------------------------------
# progress on stderr

def _fmt_seconds(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`label  done/total unit  rate unit/s  ETA m:ss` on stderr, redrawn at most a few times a second."""

    def __init__(self, label, total=None, unit="MB", scale=1e6):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.done = 0
        self.start = self.last_draw = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.last_draw >= (0.2 if self.tty else 10.0):
            self.last_draw = now
            self._draw(final=False)

    def close(self):
        self._draw(final=True)

    def _draw(self, final):
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        digits = 0 if self.scale == 1 else 1
        done = f"{self.done / self.scale:.{digits}f}"
        if self.total:
            done += f"/{self.total / self.scale:.{digits}f}"
        line = f"{self.label}  {done} {self.unit}  {rate / self.scale:.1f} {self.unit}/s"
        if final:
            line += f"  in {_fmt_seconds(elapsed)}"
        elif self.total and rate > 0:
            line += f"  ETA {_fmt_seconds(max(self.total - self.done, 0) / rate)}"
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r" if self.tty else "") + line.ljust(70) + end)
        sys.stderr.flush()


def log(message):
    print(message, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# shards: 256 int32 header (magic, version, token count, zeros...) then uint16 tokens

def _atomic_write_bytes(path, chunks):
    """Write byte chunks to path via a .tmp file; returns the sha256 hex digest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
    os.replace(tmp, path)
    return digest.hexdigest()


def write_shard(path, tokens):
    """Write tokens (ids < 65536) as a shard, atomically. Returns the file's sha256."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ValueError(f"{path}: token ids must fit in uint16")
        tokens = tokens.astype(np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    return _atomic_write_bytes(path, [header.tobytes(), tokens.astype("<u2", copy=False).tobytes()])


def read_shard(path, vocab_size=None):
    """Memory-map a shard's tokens after checking its header, its size and (if vocab_size) its ids."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DataError(f"{path}: shard file not found") from None
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {MAGIC}): not a token shard, or corrupted")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise DataError(f"{path}: truncated or corrupted: header says {n_tokens} tokens "
                        f"({expected} bytes) but the file has {size} bytes")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise DataError(f"{path}: token id {top} (first bad one at position {where}) "
                            f"is out of range for vocab size {vocab_size}")
    return tokens


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Collects documents of one split and writes <split>_000000.bin, ... of shard_tokens tokens each."""

    def __init__(self, out_dir, split, eot_id, shard_tokens):
        self.out_dir, self.split, self.eot_id, self.shard_tokens = Path(out_dir), split, eot_id, shard_tokens
        self.pending, self.pending_tokens = [], 0
        self.shards, self.documents, self.tokens = [], 0, 0

    def add(self, doc_tokens):
        self.pending.append(np.array([self.eot_id] + list(doc_tokens), dtype=np.uint16))
        self.pending_tokens += len(self.pending[-1])
        self.documents += 1
        if self.pending_tokens >= self.shard_tokens:
            self._flush(final=False)

    def close(self):
        self._flush(final=True)
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}

    def _flush(self, final):
        buffer = np.concatenate(self.pending) if self.pending else np.zeros(0, np.uint16)
        while len(buffer) >= self.shard_tokens or (final and len(buffer)):
            chunk, buffer = buffer[:self.shard_tokens], buffer[self.shard_tokens:]
            name = f"{self.split}_{len(self.shards):06d}.bin"
            sha = write_shard(self.out_dir / name, chunk)
            self.shards.append({"file": name, "tokens": int(len(chunk)), "sha256": sha})
            self.tokens += len(chunk)
        self.pending, self.pending_tokens = [buffer], len(buffer)


# -----------------------------------------------------------------------------
# tokenizer: tiktoken file (base64 token bytes + rank per line) + tokenizer.json beside it

TOKENIZER_FILE = "tokenizer.tiktoken"
TOKENIZER_JSON = "tokenizer.json"


def train_tokenizer(texts, vocab_size):
    """Train a byte-level BPE with rustbpe; returns a tiktoken.Encoding with <|endoftext|> = last id."""
    try:
        import rustbpe
    except ImportError:
        raise DataError("rustbpe is not installed here: train the tokenizer on a machine that has it "
                        "and pass its file with --tokenizer PATH") from None
    texts = list(texts)
    started = time.time()
    progress = Progress(f"training BPE tokenizer (vocab {vocab_size}): reading",
                        total=sum(map(len, texts)), unit="M chars")

    def feed():
        for text in texts:
            progress.update(len(text))
            yield text
        progress.close()
        log("training BPE tokenizer: computing merges")

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(feed(), vocab_size - 1)  # the last id is kept for the separator
    log(f"trained the tokenizer in {_fmt_seconds(time.time() - started)}")
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return _make_encoding(ranks, trainer.get_pattern(), name=None)


def _make_encoding(ranks, pattern, name):
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError("tokenizer ranks are not the contiguous ids 0..n-1")
    eot_id = len(ranks)
    if name is None:
        name = f"bpe{eot_id + 1}-{hashlib.sha256(_tiktoken_bytes(ranks)).hexdigest()[:8]}"
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: eot_id})


def _tiktoken_bytes(ranks):
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(ranks.items(), key=lambda item: item[1]))
    return b"\n".join(lines) + b"\n"


def _mergeable_ranks(enc):
    specials = set(enc._special_tokens.values())
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in specials}


def save_tokenizer(enc, out_dir):
    """Write tokenizer.tiktoken and tokenizer.json into out_dir; returns the json's contents."""
    ranks = _mergeable_ranks(enc)
    sha = _atomic_write_bytes(Path(out_dir) / TOKENIZER_FILE, [_tiktoken_bytes(ranks)])
    info = {"name": enc.name, "file": TOKENIZER_FILE, "sha256": sha, "pattern": enc._pat_str,
            "special_tokens": dict(enc._special_tokens), "vocab_size": enc.n_vocab}
    _atomic_write_bytes(Path(out_dir) / TOKENIZER_JSON, [json.dumps(info, indent=2).encode()])
    return info


def _tokenizer_path(path):
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def read_tokenizer_file(path):
    """Load a tokenizer.tiktoken file (or a directory holding one) with its tokenizer.json."""
    path = _tokenizer_path(path)
    info_path = path.with_name(TOKENIZER_JSON)
    try:
        info = json.loads(info_path.read_text())
        ranks = {}
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except FileNotFoundError as e:
        raise DataError(f"{e.filename}: tokenizer file not found (need {TOKENIZER_FILE} and {TOKENIZER_JSON})") from None
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: not a valid tokenizer file ({e})") from None
    enc = _make_encoding(ranks, info["pattern"], info["name"])
    if enc._special_tokens != info["special_tokens"]:
        raise DataError(f"{info_path}: special tokens {info['special_tokens']} do not match the ranks in {path}")
    return enc


def load_gpt2_encoding():
    """tiktoken's GPT-2 encoding, or None when its vocabulary cannot be fetched (offline, no cache)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        return None


def load_tokenizer(data_dir):
    """The tiktoken.Encoding a data directory was tokenized with."""
    meta = load_meta(data_dir)
    if meta.get("tokenizer_file"):
        enc = read_tokenizer_file(Path(data_dir) / meta["tokenizer_file"])
    elif meta.get("tokenizer") == "gpt2":
        enc = load_gpt2_encoding()
        if enc is None:
            raise DataError(f"{data_dir}: GPT-2 vocabulary unavailable (tiktoken could not download it; offline?)")
    else:
        raise DataError(f"{data_dir}/meta.json names no tokenizer file")
    if enc.n_vocab != meta["vocab_size"]:
        raise DataError(f"{data_dir}: tokenizer has {enc.n_vocab} ids but meta.json says {meta['vocab_size']}")
    return enc


def token_byte_lengths(data_dir):
    """UTF-8 byte length of every token id (0 for special tokens); None when the vocabulary is unavailable."""
    try:
        enc = load_tokenizer(data_dir)
    except DataError as e:
        log(f"bits per byte unavailable: {e}")
        return None
    specials = set(enc._special_tokens.values())
    return np.array([0 if i in specials else len(enc.decode_single_token_bytes(i))
                     for i in range(enc.n_vocab)], dtype=np.int64)


# -----------------------------------------------------------------------------
# corpora: a list of documents (group, origin, text); the group decides the split

SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "lib-dynload"}
VENDOR_DIRS = {"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern", "externals", "third_party"}
TEXT_SUFFIXES = {".txt", ".md"}


def _normalize_group(name):
    name = name.lower().replace("-", "_")
    return (name[:-3] if name.endswith(".py") else name).strip("_") or name


def _walk_files(root, suffixes):
    """Files under root with one of the suffixes, in sorted order, skipping tests and caches."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        found += [Path(folder) / f for f in sorted(files) if Path(f).suffix in suffixes]
    return found


def _site_package_projects(site_dir):
    """Map a top-level name in site-packages (e.g. '_pytest') to its project ('pytest')."""
    import importlib.metadata
    projects = {}
    for dist in importlib.metadata.distributions(path=[str(site_dir)]):
        project = _normalize_group(dist.metadata["Name"] or "")
        tops = {file.parts[0] for file in dist.files or [] if file.parts}
        for top in sorted(tops):
            if project and top != ".." and not top.endswith((".dist-info", ".egg-info", ".data")):
                projects.setdefault(_normalize_group(top), project)
    return projects


def _site_package_group(relative, projects):
    # A vendored copy (pip/_vendor/requests) is grouped with its original (requests).
    parts = relative.parts
    for i, part in enumerate(parts[:-1]):
        if part in VENDOR_DIRS and parts[i + 1] != "__init__.py":
            return _normalize_group(parts[i + 1])
    top = _normalize_group(parts[0])
    return projects.get(top, top)


def local_files(include_site_packages):
    """(group, origin, path) for the stdlib sources and optionally the installed packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    topics = stdlib / "pydoc_data" / "topics.py"  # read as prose by pydoc_topics() instead
    files = [(_normalize_group(p.relative_to(stdlib).parts[0]), f"stdlib:{p.relative_to(stdlib)}", p)
             for p in _walk_files(stdlib, {".py"}) if p != topics]
    if include_site_packages:
        site_dirs = dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib"))
        for site in site_dirs:
            projects = _site_package_projects(site)
            files += [(_site_package_group(p.relative_to(site), projects), f"site:{p.relative_to(site)}", p)
                      for p in _walk_files(site, {".py"})]
    return files


def pydoc_topics():
    """The stdlib's help() topics: one prose document each, each its own group."""
    from pydoc_data.topics import topics
    return [(f"pydoc_data.topics.{key}", f"pydoc_data.topics:{key}", text) for key, text in sorted(topics.items())]


def path_files(root):
    """(group, origin, path) for a user file or directory of .txt/.md/.jsonl."""
    root = Path(root)
    if root.is_file():
        return [("", root.name, root)]
    files = _walk_files(root, TEXT_SUFFIXES | {".jsonl"})
    if not files:
        raise DataError(f"{root}: no .txt, .md or .jsonl files found")
    return [(_normalize_group(p.relative_to(root).parts[0]), str(p.relative_to(root)), p) for p in files]


def _split_text_file(name, text, target_chars=65536):
    """A lone text file becomes ~64 KB sections cut at blank lines, so it can be split into train/val."""
    sections, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target_chars:
            sections.append("\n\n".join(current))
            current, size = [], 0
    if current:
        sections.append("\n\n".join(current))
    return [(f"{name}#{i}", f"{name}#{i}", s) for i, s in enumerate(sections)]


def _jsonl_documents(path, origin):
    docs = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError too
                raise DataError(f"{path}:{line_no}: expected a JSON object with a string 'text' field") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: the 'text' field is not a string")
            # each record is its own group: records are independent documents
            docs.append((hashlib.sha256(text.encode()).hexdigest(), f"{origin}:{line_no}", text))
    return docs


def read_documents(files, extra_documents=()):
    """Read files into deduplicated documents. Returns (documents, what_was_read)."""
    documents, seen = [], set()
    stats = {"files": 0, "bytes": 0, "duplicates": 0, "empty": 0, "undecodable": 0}
    progress = Progress("reading files", total=len(files), unit="files", scale=1)

    def keep(doc):
        digest = hashlib.sha256(doc[2].encode()).digest()
        if not doc[2].strip():
            stats["empty"] += 1
        elif digest in seen:
            stats["duplicates"] += 1
        else:
            seen.add(digest)
            documents.append(doc)

    for group, origin, path in files:
        progress.update(1)
        stats["files"] += 1
        stats["bytes"] += path.stat().st_size
        if path.suffix == ".jsonl":
            for doc in _jsonl_documents(path, origin):
                keep(doc)
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["undecodable"] += 1
            continue
        if group == "":  # a single user file given as --source
            for doc in _split_text_file(path.name, text):
                keep(doc)
        else:
            keep((group, origin, text))
    progress.close()
    for doc in extra_documents:
        stats["bytes"] += len(doc[2].encode())
        keep(doc)
    stats["documents"] = len(documents)
    return documents, stats


def is_val_group(group, val_fraction):
    """Stable split: a group's hash decides, so adding other groups never moves it."""
    h = int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


# -----------------------------------------------------------------------------
# building a local / user-text data directory

def encode_split(enc, texts, writer, label):
    progress = Progress(f"tokenizing {label}", total=sum(len(t) for t in texts), unit="M chars")
    threads = os.cpu_count() or 1
    batch = max(threads * 16, 64)
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        for ids in enc.encode_ordinary_batch(chunk, num_threads=threads):
            writer.add(ids)
        progress.update(sum(len(t) for t in chunk))
    progress.close()
    return writer.close()


def build_text_dataset(out_dir, files, extra_documents, args, read_info):
    documents, stats = read_documents(files, extra_documents)
    train = [d for d in documents if not is_val_group(d[0], args.val_fraction)]
    val = [d for d in documents if is_val_group(d[0], args.val_fraction)]
    n_groups = len({d[0] for d in documents})
    for split, docs in (("train", train), ("val", val)):
        if not docs:
            raise DataError(f"{args.source}: the {split} split is empty ({len(documents)} documents in "
                            f"{n_groups} groups); add data or change --val-fraction")
    log(f"{len(documents)} documents in {n_groups} groups: {len(train)} train, {len(val)} val "
        f"({stats['duplicates']} duplicates dropped, {stats['undecodable']} non-UTF-8 files skipped)")

    if args.tokenizer:
        enc = read_tokenizer_file(args.tokenizer)
        log(f"using tokenizer {enc.name} from {args.tokenizer}")
    else:
        enc = train_tokenizer((d[2] for d in train), args.vocab_size)
        if enc.n_vocab < args.vocab_size:
            log(f"note: the corpus only supports {enc.n_vocab - 1} merges; vocab size is {enc.n_vocab}")
    if enc.n_vocab > 2**16:
        raise DataError(f"tokenizer has {enc.n_vocab} ids; uint16 shards hold at most 65536")
    tokenizer_info = save_tokenizer(enc, out_dir)

    eot_id = enc._special_tokens[EOT]
    splits = {}
    for split, docs in (("train", train), ("val", val)):
        writer = ShardWriter(out_dir, split, eot_id, args.shard_tokens)
        splits[split] = encode_split(enc, [d[2] for d in docs], writer, split)
    read_info.update(stats, groups=n_groups)
    return tokenizer_info, splits


# -----------------------------------------------------------------------------
# downloading llm.c shards (FineWeb / FineWeb-Edu, GPT-2 tokens)

class _Retryable(Exception):
    pass


class _Corrupt(Exception):
    pass


def _fetch_into(session, url, part, timeout, label):
    """One attempt: continue part from its current size. Raises _Retryable if the transfer stops short."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 416:  # nothing left to fetch: let verification judge what we have
            return
        if status == 404:
            raise DataError(f"{url}: not found (HTTP 404)")
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}")
        if status not in (200, 206):
            raise DataError(f"{url}: HTTP {status}")
        if status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()
            raise _Retryable("server resumed at the wrong offset")
        if status == 200:
            have = 0  # the server ignored Range: start over
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        total = int(total) if total.isdigit() else (
            have + int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None)
        progress = Progress(label, total=total)
        progress.update(have)
        try:
            with open(part, "ab" if have else "wb") as f:
                # small chunks: a chunk cut short by a dropped connection is lost, not written
                for chunk in response.iter_content(chunk_size=1 << 16):
                    header_was_missing = f.tell() < HEADER_BYTES
                    f.write(chunk)
                    progress.update(len(chunk))
                    if header_was_missing and f.tell() >= HEADER_BYTES:
                        f.flush()
                        _check_header_early(part)  # don't download 200 MB of an error page
        finally:
            progress.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"transfer stopped at {size} of {total} bytes")


def _check_header_early(part):
    header = np.fromfile(part, dtype="<i4", count=2)
    if header[0] != MAGIC or header[1] != VERSION:
        raise _Corrupt(f"bad header (magic {header[0]}, version {header[1]})")


def download_shard(url, dest, vocab_size=None, retries=5, backoff=1.0, timeout=30.0, session=None):
    """Download url to dest via dest.part: resumable (HTTP Range), retried with exponential backoff,
    header and size verified before dest appears. Total time is bounded by retries * (timeout + backoff)."""
    import requests
    session = session or requests.Session()
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    connection_only = True  # every failure so far was a failure to connect: probably offline
    for attempt in range(retries + 1):
        try:
            _fetch_into(session, url, part, timeout, f"downloading {dest.name}")
            try:
                read_shard(part, vocab_size)
            except DataError as e:
                raise _Corrupt(str(e).replace(f"{part}: ", "")) from None
            os.replace(part, dest)
            return dest
        except _Corrupt as e:
            part.unlink(missing_ok=True)
            problem, connection_only = f"corrupted download rejected: {e}", False
        except _Retryable as e:
            problem, connection_only = str(e), False
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            problem = f"connection problem ({type(e).__name__})"
            connection_only &= not part.exists() and not isinstance(e, requests.exceptions.ChunkedEncodingError)
        if attempt == retries:
            break
        delay = min(backoff * 2 ** attempt, 60.0)
        log(f"{dest.name}: {problem}; retry {attempt + 1}/{retries} in {delay:.1f}s")
        time.sleep(delay)
    offline = "; offline? --source local works without a network" if connection_only else ""
    raise DataError(f"{url}: gave up after {retries + 1} attempts: {problem}{offline}")


def _require_network(url, source):
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        raise DataError(f"no network: cannot resolve {host}, which --source {source} downloads from; "
                        f"use --source local for an offline corpus") from None


def build_remote_dataset(out_dir, args, read_info):
    repo, prefix = REMOTE_SOURCES[args.source]
    base = (args.base_url or os.environ.get(BASE_URL_ENV) or HF_BASE.format(repo=repo)).rstrip("/")
    _require_network(base, args.source)
    # Downloads land in out_dir itself so they can resume; meta.json, written last, marks it complete.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    wanted = [("val", f"{prefix}_val_000000.bin", "val_000000.bin")]
    wanted += [("train", f"{prefix}_train_{i + 1:06d}.bin", f"train_{i:06d}.bin") for i in range(args.shards)]
    for split, remote, local in wanted:
        dest = out_dir / local
        if dest.exists():  # only complete, verified files get their final name
            continue
        download_shard(f"{base}/{remote}", dest, GPT2_VOCAB_SIZE, retries=args.retries)

    enc = load_gpt2_encoding()
    if enc is not None:
        tokenizer_info = save_tokenizer(enc, out_dir)
    else:
        log("note: GPT-2 vocabulary unavailable (tiktoken could not download it): bits per byte will be "
            "unavailable for this data unless tiktoken's 'gpt2' files are cached")
        tokenizer_info = {"name": "gpt2", "file": None, "pattern": None,
                          "special_tokens": {EOT: GPT2_VOCAB_SIZE - 1}, "vocab_size": GPT2_VOCAB_SIZE}

    splits = {"train": {"documents": 0, "tokens": 0, "shards": []}, "val": {"documents": 0, "tokens": 0, "shards": []}}
    progress = Progress("verifying shards", total=len(wanted), unit="files", scale=1)
    for split, remote, local in wanted:
        tokens = read_shard(out_dir / local, GPT2_VOCAB_SIZE)
        splits[split]["documents"] += int(np.count_nonzero(tokens == GPT2_VOCAB_SIZE - 1))
        splits[split]["tokens"] += len(tokens)
        splits[split]["shards"].append({"file": local, "tokens": len(tokens), "sha256": file_sha256(out_dir / local),
                                        "url": f"{base}/{remote}"})
        progress.update(1)
    progress.close()
    read_info.update(base_url=base, files=len(wanted), bytes=sum((out_dir / w[2]).stat().st_size for w in wanted))
    return tokenizer_info, splits


# -----------------------------------------------------------------------------
# meta.json

def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; prepare the data first, e.g. `python prepare_data.py`") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rebuild with `python prepare_data.py --force`") from None


# The corpora built from what is on this machine, no network: directory -> prepare_data.py flags.
# train.py and sweep.py build them when they are asked for and missing. data/demo's small
# vocabulary leaves the tiny CPU models more of their FLOPs for the blocks.
EMBEDDED = {"data/local": [], "data/demo": ["--vocab-size", "1024"],
            "data/local-site": ["--include-site-packages", "--vocab-size", "8192"],
            # midi's corpus: cut with the tokenizer kept in the repo, so no rustbpe is needed
            "data/midi": ["--include-site-packages", "--tokenizer", str(REPO_DIR / "results" / "midi")]}


def ensure_embedded(data_dir, say=print):
    """Builds data_dir if it is one of EMBEDDED and has no meta.json yet; True if it is ready.
    Runs this file in a subprocess so its output and memory stay out of the caller."""
    if (Path(data_dir) / "meta.json").exists():
        return True
    flags = EMBEDDED.get(os.path.normpath(data_dir))
    if flags is None:
        return False
    say(f"{data_dir} is missing: building it from this machine's Python sources (offline, seconds)")
    res = subprocess.run([sys.executable, str(REPO_DIR / "prepare_data.py"), "--out", str(data_dir), *flags],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode or not (Path(data_dir) / "meta.json").exists():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"building {data_dir} failed (exit {res.returncode}): {last}")
    return True


def overall_checksum(splits):
    lines = [f"{split}/{s['file']} {s['sha256']}" for split in ("train", "val") for s in splits[split]["shards"]]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _ready(out_dir, config):
    """Whether out_dir already holds complete data built with this config; raises if built differently."""
    try:
        meta = load_meta(out_dir)
    except DataError:
        return False
    if meta.get("config") != config:
        changed = sorted(k for k in set(config) | set(meta.get("config", {}))
                         if config.get(k) != meta.get("config", {}).get(k))
        raise DataError(f"{out_dir} was built with different settings ({', '.join(changed)}); "
                        f"use --force to rebuild it or --out for another directory")
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            path = Path(out_dir) / shard["file"]
            if not path.exists() or path.stat().st_size != HEADER_BYTES + 2 * shard["tokens"]:
                log(f"{path} is missing or incomplete; rebuilding")
                return False
    return True


def _is_our_directory(path):
    ours = ("train_", "val_", "tokenizer.", "meta.json")
    return all(p.name.startswith(ours) for p in path.iterdir())


# -----------------------------------------------------------------------------
# reading for training

class TrainLoader:
    """Deterministic training batches: which windows a step sees depends only on (seed, step).

    Windows are non-overlapping starts at multiples of seq_len within each train shard, each
    reading seq_len+1 tokens (never across shards). Epoch k visits them in the order of a
    permutation seeded by (seed, k); epochs are concatenated into one stream. Optimizer step t
    uses stream entries [t*R, (t+1)*R), R = batch_tokens // seq_len; rank r, micro-step m takes
    the contiguous slice starting at (r*n_micro + m)*device_batch. So resuming, changing the
    number of GPUs, or the device batch never changes the data of a step.

    max_tokens keeps only a fixed random subset of max_tokens // seq_len windows (chosen by a
    generator independent of `seed`, so every seed and run sees the same subset): a smaller
    corpus for data-repetition controls, with the val split unchanged.
    """

    def __init__(self, data_dir, seq_len, batch_tokens, device_batch, seed=0, rank=0, world_size=1,
                 max_tokens=None):
        if seq_len < 1 or device_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader arguments: seq_len={seq_len}, device_batch={device_batch}, "
                             f"rank={rank}, world_size={world_size}")
        per_micro = seq_len * world_size * device_batch
        if batch_tokens < per_micro or batch_tokens % per_micro:
            raise ValueError(f"batch_tokens={batch_tokens} must be a positive multiple of seq_len*world_size*"
                             f"device_batch = {seq_len}*{world_size}*{device_batch} = {per_micro}")
        meta = load_meta(data_dir)
        self.seq_len, self.device_batch, self.seed, self.rank = seq_len, device_batch, seed, rank
        self.windows_per_step = batch_tokens // seq_len
        self.n_micro = self.windows_per_step // (world_size * device_batch)
        self.shards = _open_split(data_dir, meta, "train")
        counts = [max(len(s) - 1, 0) // seq_len for s in self.shards]
        self._shard_ends = np.cumsum(counts)
        self.n_windows = int(self._shard_ends[-1])
        if self.n_windows == 0:
            raise DataError(f"{data_dir}: the train split has no window of {seq_len + 1} tokens")
        self._subset = None
        if max_tokens is not None:
            keep = int(max_tokens) // seq_len
            if not 1 <= keep <= self.n_windows:
                raise DataError(f"max_tokens={max_tokens:g} must give 1..{self.n_windows} windows of "
                                f"{seq_len} tokens (the train split's)")
            self._subset = np.sort(np.random.default_rng(12345).permutation(self.n_windows)[:keep])
            self.n_windows = keep
        self._permutations = {}
        self._epochs_announced = {0}

    def epochs_seen(self, steps):
        return steps * self.windows_per_step / self.n_windows

    def window_indices(self, step, micro):
        """Indices (into the concatenated train windows) of the rows of batch(step, micro)."""
        if step < 0 or not 0 <= micro < self.n_micro:
            raise ValueError(f"step must be >= 0 and micro in [0, {self.n_micro}); got {step}, {micro}")
        start = step * self.windows_per_step + (self.rank * self.n_micro + micro) * self.device_batch
        stream = np.arange(start, start + self.device_batch)
        epochs, positions = np.divmod(stream, self.n_windows)
        picked = np.array([self._permutation(int(e))[p] for e, p in zip(epochs, positions)], dtype=np.int64)
        return picked if self._subset is None else self._subset[picked]

    def batch(self, step, micro):
        rows = np.empty((self.device_batch, self.seq_len + 1), dtype=np.int64)
        for row, window in zip(rows, self.window_indices(step, micro)):
            shard = int(np.searchsorted(self._shard_ends, window, side="right"))
            first = window - (self._shard_ends[shard - 1] if shard else 0)
            row[:] = self.shards[shard][first * self.seq_len: first * self.seq_len + self.seq_len + 1]
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def _permutation(self, epoch):
        if epoch not in self._permutations:
            if epoch not in self._epochs_announced and self.rank == 0:
                log(f"data: all {self.n_windows} train windows used; starting epoch {epoch + 1} "
                    f"with a new permutation")
            self._epochs_announced.add(epoch)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.n_windows)
        return self._permutations[epoch]


def _open_split(data_dir, meta, split):
    shards = []
    for info in meta["splits"][split]["shards"]:
        path = Path(data_dir) / info["file"]
        tokens = read_shard(path, meta["vocab_size"])
        if len(tokens) != info["tokens"]:
            raise DataError(f"{path}: holds {len(tokens)} tokens but meta.json says {info['tokens']}")
        shards.append(tokens)
    if not shards:
        raise DataError(f"{data_dir}: meta.json lists no {split} shards")
    return shards


def val_batches(data_dir, seq_len, n_tokens, device_batch, rank=0, world_size=1):
    """(x, y) batches over the first n_tokens // seq_len val windows (in file order), split across ranks.

    The windows are the same whatever world_size: rank r gets the contiguous block
    [r*N//world_size, (r+1)*N//world_size). Each rank's last batch may be smaller than
    device_batch, and ranks may get different numbers of batches, so average with
    token-weighted sums all-reduced at the end, not with per-batch collectives. If the val
    split holds fewer windows than asked for, all of them are used (noted on stderr).
    """
    meta = load_meta(data_dir)
    shards = _open_split(data_dir, meta, "val")
    windows = [(s, i * seq_len) for s, tokens in enumerate(shards) for i in range(max(len(tokens) - 1, 0) // seq_len)]
    wanted = n_tokens // seq_len
    if not windows or wanted < 1:
        raise DataError(f"{data_dir}: no val windows of {seq_len + 1} tokens (asked for {n_tokens} tokens)")
    if wanted > len(windows) and rank == 0:
        log(f"data: val split holds {len(windows)} windows of {seq_len}; using all "
            f"{len(windows) * seq_len} tokens instead of {n_tokens}")
    n = min(wanted, len(windows))
    mine = windows[rank * n // world_size:(rank + 1) * n // world_size]

    def batches():
        for i in range(0, len(mine), device_batch):
            rows = np.stack([shards[s][start:start + seq_len + 1] for s, start in mine[i:i + device_batch]])
            rows = rows.astype(np.int64)
            yield np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    return batches()


# -----------------------------------------------------------------------------
# command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    parser = _Parser(
        prog="prepare_data.py",
        description="Write a token data directory (train/val .bin shards, tokenizer, meta.json) for train.py.",
        epilog="Examples:\n"
               "  python prepare_data.py                             # stdlib sources -> data/local\n"
               "  python prepare_data.py --include-site-packages --vocab-size 32768\n"
               "  python prepare_data.py --include-site-packages --tokenizer data/local-site  # reuse, no rustbpe\n"
               "  python prepare_data.py --source fineweb-edu --shards 4\n"
               "  python prepare_data.py --source notes/ --out data/notes\n"
               "Re-running with the same arguments does nothing; --force rebuilds.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="local", metavar="SOURCE",
                        help="local (default: Python stdlib sources + pydoc topics, offline), fineweb-edu, "
                             "fineweb (GPT-2-tokenized shards from the Hugging Face hub), or a PATH: a text file, "
                             "a .jsonl file with a 'text' field, or a directory of .txt/.md/.jsonl")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: data/local, data/local-site, data/fineweb-edu, "
                             "data/fineweb or data/<name of PATH>, beside this script)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the data is ready "
                        "(downloaded shards that verify are kept)")
    parser.add_argument("--expect-checksum", metavar="SHA256_OR_META",
                        help="fail unless the data's overall checksum equals this (a hex digest or a "
                             "meta.json to take it from): the same corpus rebuilt on another machine")
    local = parser.add_argument_group("local and PATH sources")
    local.add_argument("--include-site-packages", action="store_true",
                       help="also read the sources of installed packages (local source)")
    local.add_argument("--vocab-size", type=int, metavar="N",
                       help=f"BPE vocabulary size including <|endoftext|> (default {DEFAULT_VOCAB_SIZE}; "
                            f"32768 is the paper-like setting)")
    local.add_argument("--tokenizer", metavar="PATH",
                       help="reuse an existing tokenizer.tiktoken (or a data directory holding one) "
                            "instead of training; needed where rustbpe is not installed")
    local.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                       help=f"fraction of groups (packages/projects) sent to val (default {DEFAULT_VAL_FRACTION})")
    local.add_argument("--limit-files", type=int, metavar="N",
                       help="read only the first N files and skip pydoc topics (for quick tests)")
    remote = parser.add_argument_group("fineweb-edu and fineweb sources")
    remote.add_argument("--shards", type=int, default=1, metavar="N",
                        help="number of train shards (~100M tokens, ~200 MB each) to download (default 1)")
    remote.add_argument("--base-url", metavar="URL",
                        help=f"where the shards are (default: the Hugging Face hub; env {BASE_URL_ENV})")
    remote.add_argument("--retries", type=int, default=5, metavar="N",
                        help="retries per file, with exponential backoff (default 5)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help=f"tokens per written shard (default {DEFAULT_SHARD_TOKENS})")
    args = parser.parse_args(argv)

    remote_source = args.source in REMOTE_SOURCES
    if not remote_source and args.source != "local" and not Path(args.source).exists():
        parser.error(f"--source {args.source}: no such file or directory "
                     f"(choose local, fineweb-edu, fineweb or an existing path)")
    if remote_source and (args.vocab_size or args.tokenizer or args.include_site_packages or args.limit_files):
        parser.error(f"--source {args.source} is pre-tokenized with GPT-2; "
                     f"--vocab-size, --tokenizer, --include-site-packages and --limit-files do not apply")
    if args.include_site_packages and args.source != "local":
        parser.error("--include-site-packages only applies to --source local")
    if args.tokenizer:
        if not Path(args.tokenizer).exists():
            parser.error(f"--tokenizer {args.tokenizer}: no such file or directory")
        if args.vocab_size:
            parser.error("give either --vocab-size (train a tokenizer) or --tokenizer (reuse one), not both")
    args.vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE
    if not 257 <= args.vocab_size <= 2**16:
        parser.error(f"--vocab-size must be between 257 and 65536 (uint16 shards), got {args.vocab_size}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    for name in ("shards", "retries", "shard_tokens", "limit_files"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "retries" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.shard_tokens >= 2**31:
        parser.error("--shard-tokens must be below 2**31 (the header stores an int32)")
    return args


def default_out_dir(args):
    if args.source == "local":
        name = "local-site" if args.include_site_packages else "local"
    elif args.source in REMOTE_SOURCES:
        name = args.source
    else:
        name = Path(args.source).resolve().stem or "text"
    return REPO_DIR / "data" / name


def build_config(args):
    """The settings that define the data; a re-run with the same config is a no-op."""
    if args.source in REMOTE_SOURCES:
        return {"source": args.source, "shards": args.shards,
                "base_url": args.base_url or os.environ.get(BASE_URL_ENV)}
    tokenizer = None
    if args.tokenizer:
        enc = read_tokenizer_file(args.tokenizer)  # validates it early
        tokenizer = f"{enc.name} sha256:{file_sha256(_tokenizer_path(args.tokenizer))[:16]}"
    return {"source": args.source if args.source == "local" else str(Path(args.source).resolve()),
            "include_site_packages": args.include_site_packages, "limit_files": args.limit_files,
            "vocab_size": None if tokenizer else args.vocab_size, "tokenizer": tokenizer,
            "val_fraction": args.val_fraction, "shard_tokens": args.shard_tokens}


def build_local_dataset(build_dir, args, read_info):
    if args.source == "local":
        files = local_files(args.include_site_packages)
        extra = [] if args.limit_files else pydoc_topics()
        read_info["roots"] = [sysconfig.get_paths()["stdlib"]] + (
            [sysconfig.get_paths()["purelib"]] if args.include_site_packages else [])
    else:
        files, extra = path_files(args.source), []
        read_info["roots"] = [str(Path(args.source).resolve())]
    if args.limit_files:
        files = files[:args.limit_files]
    return build_text_dataset(build_dir, files, extra, args, read_info)


def prepare(args, command):
    out_dir = Path(args.out) if args.out else default_out_dir(args)
    config = build_config(args)
    if out_dir.exists() and not args.force and _ready(out_dir, config):
        log(f"data is ready in {out_dir} (use --force to rebuild)")
        return out_dir
    if out_dir.exists() and not (out_dir.is_dir() and _is_our_directory(out_dir)):
        raise DataError(f"{out_dir}: exists and is not a prepare_data.py directory; refusing to overwrite it")

    started = time.time()
    read_info = {}
    if args.source in REMOTE_SOURCES:
        build_dir = out_dir  # downloads resume in place; meta.json, written last, marks completion
        tokenizer_info, splits = build_remote_dataset(out_dir, args, read_info)
        split_rule = "as published: the source's val shard and its first train shards"
    else:
        build_dir = out_dir.with_name(out_dir.name + ".tmp")  # replaces out_dir only when complete
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        try:
            tokenizer_info, splits = build_local_dataset(build_dir, args, read_info)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        split_rule = f"a document is val if sha256(its group: top-level package/project) < {args.val_fraction}"

    meta = {
        "name": out_dir.name,
        "source": args.source,
        "vocab_size": tokenizer_info["vocab_size"],
        "eot_id": tokenizer_info["special_tokens"][EOT],
        "tokenizer": tokenizer_info["name"],
        "tokenizer_file": tokenizer_info["file"],
        "tokenizer_pattern": tokenizer_info["pattern"],
        "special_tokens": tokenizer_info["special_tokens"],
        "splits": splits,
        "checksum": overall_checksum(splits),
        "read": read_info,
        "format": {"magic": MAGIC, "version": VERSION, "header_ints": HEADER_INTS, "dtype": "uint16",
                   "document_separator": "each document is preceded by eot_id"},
        "split_rule": split_rule,
        "config": config,
        "python": sys.version.split()[0],
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
    }
    _atomic_write_bytes(build_dir / "meta.json", [json.dumps(meta, indent=2).encode()])
    if build_dir != out_dir:
        old = out_dir.with_name(out_dir.name + ".old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(build_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    for split in ("train", "val"):
        s = splits[split]
        log(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    log(f"wrote {out_dir} (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']}) "
        f"in {_fmt_seconds(meta['seconds'])}")
    return out_dir


def check_checksum(out_dir, expected):
    """The rebuilt corpus must be byte-identical to the reference one (same shards, same order)."""
    if os.path.isfile(expected):
        with open(expected) as f:
            expected = json.load(f).get("checksum", "")
    got = load_meta(out_dir)["checksum"]
    if got != expected:
        raise DataError(f"{out_dir}: checksum {got[:16]}... differs from the expected {expected[:16]}...: "
                        f"this machine's corpus is not the reference one")
    log(f"checksum matches the reference corpus ({got[:16]}...)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "prepare_data.py", *argv])
    try:
        out_dir = prepare(args, command)
        if args.expect_checksum:
            check_checksum(out_dir, args.expect_checksum)
    except DataError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"prepare_data.py: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
