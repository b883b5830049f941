"""Tests for prepare_data.py: tokenizer, shards, loader, local source and downloader (CPU, offline, fast)."""

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prepare_data as pd  # noqa: E402
from prepare_data import DataError  # noqa: E402


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def one_line(message):
    return "\n" not in str(message).strip()


# -----------------------------------------------------------------------------
# tokenizer

TEXTS = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "class Greeter:\n\tdef greet(self, name: str) -> str:\n\t\treturn f'Hello, {name}!'  # tab-indented\n",
    "Les élèves étudient l'été; Ünïcödé straße, 日本語のテキスト, русский текст, emoji 🐍🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.\n",
] * 20


@pytest.fixture(scope="module")
def small_tokenizer():
    return pd.train_tokenizer(TEXTS, 400)


@pytest.mark.parametrize("text", [
    "print('héllo wörld')  # ✓\r\n\tx = {'k': [1, 2.5e-3, None]}\n",
    "中文 العربية हिन्दी 🧪👩‍🔬 e\u0301 \x00\x7f",
    "    if x:\n        return lambda y: y ** 2\n\n\n",
    "",
])
def test_tokenizer_round_trip(small_tokenizer, text):
    ids = small_tokenizer.encode_ordinary(text)
    assert small_tokenizer.decode(ids) == text
    assert all(0 <= i < small_tokenizer.n_vocab - 1 for i in ids)  # never the separator


def test_tokenizer_training_is_deterministic(small_tokenizer, tmp_path):
    again = pd.train_tokenizer(TEXTS, 400)
    assert pd._mergeable_ranks(again) == pd._mergeable_ranks(small_tokenizer)
    assert again.name == small_tokenizer.name
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pd.save_tokenizer(small_tokenizer, tmp_path / "a")
    pd.save_tokenizer(again, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.tiktoken").read_bytes() == (tmp_path / "b/tokenizer.tiktoken").read_bytes()


def test_tokenizer_save_load(small_tokenizer, tmp_path):
    pd.save_tokenizer(small_tokenizer, tmp_path)
    loaded = pd.read_tokenizer_file(tmp_path / "tokenizer.tiktoken")
    assert loaded.n_vocab == small_tokenizer.n_vocab == 400
    assert loaded.encode("x <|endoftext|> y", allowed_special="all") == \
        small_tokenizer.encode("x <|endoftext|> y", allowed_special="all")
    assert loaded.encode_single_token(pd.EOT) == 399  # separator = number of mergeable ranks
    for text in TEXTS[:3]:
        assert loaded.encode_ordinary(text) == small_tokenizer.encode_ordinary(text)


# -----------------------------------------------------------------------------
# shards

def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=12345).astype(np.uint16)
    sha = pd.write_shard(tmp_path / "s.bin", tokens)
    assert sha == pd.file_sha256(tmp_path / "s.bin")
    assert (tmp_path / "s.bin").stat().st_size == pd.HEADER_BYTES + 2 * len(tokens)
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=3)
    assert list(header) == [pd.MAGIC, pd.VERSION, len(tokens)]
    np.testing.assert_array_equal(pd.read_shard(tmp_path / "s.bin"), tokens)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError):
        pd.write_shard(tmp_path / "bad.bin", [70000])


def _bad_shard(tmp_path, kind):
    path = tmp_path / f"{kind}.bin"
    pd.write_shard(path, np.arange(1000, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    if kind == "magic":
        data[0:4] = np.int32(12345).tobytes()
    elif kind == "truncated":
        data = data[:-7]
    elif kind == "short":
        data = data[:100]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind, words", [("magic", "bad magic"), ("truncated", "truncated"),
                                         ("short", "truncated"), ("range", "out of range")])
def test_shard_errors_are_one_line_naming_the_file(tmp_path, kind, words):
    path = _bad_shard(tmp_path, kind)
    with pytest.raises(DataError) as info:
        pd.read_shard(path, vocab_size=500)  # tokens go up to 999: out of range
    assert str(path) in str(info.value) and words in str(info.value) and one_line(info.value)


def test_missing_shard_and_meta(tmp_path):
    with pytest.raises(DataError, match="not found"):
        pd.read_shard(tmp_path / "nope.bin")
    with pytest.raises(DataError, match="prepare_data.py"):
        pd.load_meta(tmp_path)


# -----------------------------------------------------------------------------
# loader on a synthetic data directory where each token is its position

def make_data_dir(path, train_lengths, val_lengths, vocab_size=65536):
    """Shards whose tokens are distinct counters; shard k starts at 10000*k, so crossing shows as a jump."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, lengths in (("train", train_lengths), ("val", val_lengths)):
        shards = []
        for k, n in enumerate(lengths):
            name = f"{split}_{k:06d}.bin"
            base = 10000 * k + (30000 if split == "val" else 0)
            sha = pd.write_shard(path / name, np.arange(base, base + n, dtype=np.uint16))
            shards.append({"file": name, "tokens": n, "sha256": sha})
        splits[split] = {"documents": 1, "tokens": sum(lengths), "shards": shards}
    meta = {"name": path.name, "vocab_size": vocab_size, "eot_id": vocab_size - 1, "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


T = 8


@pytest.fixture
def data_dir(tmp_path):
    # windows per shard: (n - 1) // T -> 12 + 7 + 5 = 24
    return make_data_dir(tmp_path / "d", [100, 60, 41], [50, 40])


def starts(x):
    return sorted(int(v) for v in x[:, 0])


def test_loader_batch_shape_and_shift(data_dir):
    loader = pd.TrainLoader(data_dir, T, batch_tokens=4 * T, device_batch=2)
    assert loader.n_windows == 24 and loader.n_micro == 2
    for step in range(6):
        for micro in range(2):
            x, y = loader.batch(step, micro)
            assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (2, T)
            assert (np.diff(x, axis=1) == 1).all() and (y == x + 1).all()  # contiguous: never crosses a shard
            assert all(v % 10000 % T == 0 for v in x[:, 0])  # starts at multiples of T within a shard


def test_loader_is_deterministic_and_seeded(data_dir):
    a = pd.TrainLoader(data_dir, T, 4 * T, 2, seed=1)
    b = pd.TrainLoader(data_dir, T, 4 * T, 2, seed=1)
    c = pd.TrainLoader(data_dir, T, 4 * T, 2, seed=2)
    steps = [(s, m) for s in range(6) for m in range(2)]
    assert all((a.batch(s, m)[0] == b.batch(s, m)[0]).all() for s, m in steps)
    assert any((a.batch(s, m)[0] != c.batch(s, m)[0]).any() for s, m in steps)


def test_loader_resume_is_equivalent(data_dir):
    first = pd.TrainLoader(data_dir, T, 8 * T, 2, seed=3)
    seen = {(s, m): first.batch(s, m)[0] for s in range(12) for m in range(first.n_micro)}  # crosses epochs
    resumed = pd.TrainLoader(data_dir, T, 8 * T, 2, seed=3)
    for s in range(7, 12):
        for m in range(resumed.n_micro):
            np.testing.assert_array_equal(resumed.batch(s, m)[0], seen[(s, m)])


def test_ranks_are_disjoint_and_match_one_gpu(data_dir):
    batch_tokens = 8 * T  # R = 8 windows per step
    one = pd.TrainLoader(data_dir, T, batch_tokens, device_batch=8)
    four = [pd.TrainLoader(data_dir, T, batch_tokens, device_batch=2, rank=r, world_size=4) for r in range(4)]
    assert one.n_micro == 1 and four[0].n_micro == 1
    two = [pd.TrainLoader(data_dir, T, batch_tokens, device_batch=1, rank=r, world_size=2) for r in range(2)]
    assert two[0].n_micro == 4
    for step in range(3):  # 24 windows: exactly one epoch
        single = starts(one.batch(step, 0)[0])
        parts = [starts(ld.batch(step, 0)[0]) for ld in four]
        assert sum(len(p) for p in parts) == len(set().union(*map(set, parts))) == 8  # disjoint
        assert sorted(sum(parts, [])) == single
        assert sorted(sum((starts(ld.batch(step, m)[0]) for ld in two for m in range(4)), [])) == single


def test_epoch_rollover(data_dir, capsys):
    loader = pd.TrainLoader(data_dir, T, 4 * T, 4)  # 4 windows per step, 6 steps per epoch
    epoch1 = sum((starts(loader.batch(s, 0)[0]) for s in range(6)), [])
    assert len(set(epoch1)) == 24  # every window exactly once per epoch
    assert "epoch" not in capsys.readouterr().err
    epoch2 = sum((starts(loader.batch(s, 0)[0]) for s in range(6, 12)), [])
    assert sorted(epoch2) == sorted(epoch1)
    assert [loader.window_indices(s, 0).tolist() for s in range(6, 12)] != \
        [loader.window_indices(s, 0).tolist() for s in range(6)]  # a new permutation
    assert "starting epoch 2" in capsys.readouterr().err
    assert loader.epochs_seen(12) == 2.0 and loader.epochs_seen(9) == 1.5


def test_loader_rejects_bad_arguments_and_data(data_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        pd.TrainLoader(data_dir, T, batch_tokens=3 * T, device_batch=2)
    with pytest.raises(ValueError, match="multiple"):
        pd.TrainLoader(data_dir, T, batch_tokens=4 * T, device_batch=1, world_size=3)
    small_vocab = make_data_dir(tmp_path / "v", [100], [50], vocab_size=90)
    with pytest.raises(DataError, match="out of range"):
        pd.TrainLoader(small_vocab, T, 4 * T, 2)
    shard = data_dir / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError) as info:
        pd.TrainLoader(data_dir, T, 4 * T, 2)
    assert str(shard) in str(info.value) and one_line(info.value)


def test_val_batches_same_windows_for_any_world_size(data_dir):
    def windows(world, batch):
        per_rank = [[x for x, _ in pd.val_batches(data_dir, T, 9 * T, batch, rank=r, world_size=world)]
                    for r in range(world)]
        return per_rank, sorted(sum((starts(x) for rank in per_rank for x in rank), []))

    (single,), expected = windows(1, 4)
    assert len(expected) == 9 and [len(x) for x in single] == [4, 4, 1]  # last batch smaller
    assert expected[0] == 30000  # a fixed prefix, in file order
    for world in (2, 3, 4):
        per_rank, got = windows(world, 2)
        assert got == expected and len(set(got)) == 9
    x, y = next(pd.val_batches(data_dir, T, 9 * T, 4))
    assert (y == x + 1).all() and x.dtype == np.int64


def test_val_batches_clamps_to_the_split(data_dir, capsys):
    all_windows = sum(len(x) for x, _ in pd.val_batches(data_dir, T, 10**6, 4))
    assert all_windows == 6 + 4 and "val split holds" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# local source on a slice of the stdlib

def split_documents(tokens, eot_id):
    """Documents of a split: each starts with the separator."""
    tokens = np.asarray(tokens)
    cuts = np.flatnonzero(tokens == eot_id)
    assert len(cuts) and cuts[0] == 0
    return [tokens[a + 1:b].tolist() for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "data"
    args = ["--limit-files", "40", "--vocab-size", "600", "--val-fraction", "0.3", "--shard-tokens", "20000",
            "--out", out]
    assert pd.main(list(map(str, args))) == 0
    return out


def test_local_meta_matches_shards(local_dir):
    meta = pd.load_meta(local_dir)
    assert meta["vocab_size"] == 600 and meta["eot_id"] == 599 and meta["source"] == "local"
    assert meta["tokenizer_file"] == "tokenizer.tiktoken" and meta["read"]["files"] == 40
    assert "--limit-files 40" in meta["command"]
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        tokens = []
        for shard in info["shards"]:
            data = pd.read_shard(local_dir / shard["file"], meta["vocab_size"])
            assert len(data) == shard["tokens"] and pd.file_sha256(local_dir / shard["file"]) == shard["sha256"]
            tokens.append(np.asarray(data))
        assert len(split_documents(np.concatenate(tokens), meta["eot_id"])) == info["documents"] > 0
    assert len(meta["splits"]["train"]["shards"]) > 1  # --shard-tokens 20000 forces several
    assert meta["checksum"] == pd.overall_checksum(meta["splits"])
    assert sorted(p.name for p in local_dir.iterdir() if not p.name.endswith(".bin")) == \
        ["meta.json", "tokenizer.json", "tokenizer.tiktoken"]


def test_local_split_is_disjoint_by_document_and_group(local_dir):
    meta = pd.load_meta(local_dir)
    enc = pd.load_tokenizer(local_dir)
    texts = {}
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(pd.read_shard(local_dir / s["file"])) for s in meta["splits"][split]["shards"]])
        texts[split] = [enc.decode(doc) for doc in split_documents(tokens, meta["eot_id"])]
    assert not set(texts["train"]) & set(texts["val"])
    documents, _ = pd.read_documents(pd.local_files(False)[:40])
    by_text = {text: group for group, _, text in documents}
    for split, is_val in (("train", False), ("val", True)):
        assert all(pd.is_val_group(by_text[t], 0.3) == is_val for t in texts[split])
    assert sorted(texts["train"] + texts["val"]) == sorted(by_text)


def test_token_byte_lengths(local_dir):
    lengths = pd.token_byte_lengths(local_dir)
    enc = pd.load_tokenizer(local_dir)
    assert lengths.shape == (600,) and lengths[599] == 0 and (lengths[:256] == 1).all()
    text = "import os\nprint(os.getcwd())  # ünï\n"
    assert lengths[enc.encode_ordinary(text)].sum() == len(text.encode())


def test_rerun_is_a_no_op_and_force_rebuilds(local_dir, capsys):
    args = ["--limit-files", "40", "--vocab-size", "600", "--val-fraction", "0.3", "--shard-tokens", "20000",
            "--out", str(local_dir)]
    before = {p.name: p.stat().st_mtime_ns for p in local_dir.iterdir()}
    assert pd.main(args) == 0
    assert "ready" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in local_dir.iterdir()}
    checksum = pd.load_meta(local_dir)["checksum"]
    assert pd.main(args + ["--force"]) == 0
    assert pd.load_meta(local_dir)["checksum"] == checksum  # same input, same bytes
    assert before != {p.name: p.stat().st_mtime_ns for p in local_dir.iterdir()}
    assert not list(local_dir.parent.glob("data.*"))  # no leftover .tmp/.old directories
    changed = [a if a != "0.3" else "0.2" for a in args]  # another --val-fraction
    assert pd.main(changed) == 2
    assert "different settings" in capsys.readouterr().err


def test_reusing_a_tokenizer_gives_identical_shards(local_dir, tmp_path):
    out = tmp_path / "again"
    args = ["--limit-files", "40", "--tokenizer", local_dir, "--val-fraction", "0.3", "--shard-tokens", "20000",
            "--out", out]
    assert pd.main(list(map(str, args))) == 0
    assert pd.load_meta(out)["checksum"] == pd.load_meta(local_dir)["checksum"]


def test_expect_checksum_accepts_the_same_corpus_and_refuses_another(local_dir, tmp_path, capsys):
    args = ["--limit-files", "40", "--tokenizer", local_dir, "--val-fraction", "0.3", "--shard-tokens",
            "20000", "--out", tmp_path / "same", "--expect-checksum", local_dir / "meta.json"]
    assert pd.main(list(map(str, args))) == 0
    other = ["--limit-files", "39", "--tokenizer", local_dir, "--val-fraction", "0.3", "--shard-tokens",
             "20000", "--out", tmp_path / "other", "--expect-checksum", pd.load_meta(local_dir)["checksum"]]
    assert pd.main(list(map(str, other))) == 2
    assert "not the reference one" in capsys.readouterr().err


def test_user_text_directory(tmp_path):
    src = tmp_path / "notes"
    for i in range(12):
        (src / f"topic{i}").mkdir(parents=True)
        (src / f"topic{i}" / "a.md").write_text(f"# Topic {i}\n\nSome notes about item {i}. " * 30)
        (src / f"topic{i}" / "b.txt").write_text(f"plain text number {i}, café ☕ " * 20)
    (src / "copy.txt").write_text((src / "topic0" / "b.txt").read_text())  # a duplicate
    (src / "records.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 50, "id": i}) for i in range(20)))
    (src / "ignored.bin").write_bytes(b"\x00\xff")
    out = tmp_path / "out"
    assert pd.main(["--source", str(src), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    meta = pd.load_meta(out)
    assert meta["read"]["duplicates"] == 1 and meta["read"]["documents"] == 24 + 20
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 44
    (src / "records.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    result = run_cli("--source", src, "--out", tmp_path / "out2", "--vocab-size", 300)
    assert result.returncode == 2 and one_line(result.stderr) and "records.jsonl:2" in result.stderr


@pytest.mark.parametrize("args, words", [
    (["--vocab-size", "3"], "--vocab-size"),
    (["--source", "/no/such/place"], "no such file"),
    (["--source", "fineweb-edu", "--vocab-size", "512"], "do not apply"),
    (["--tokenizer", "/no/such/tokenizer"], "no such file"),
    (["--shards", "x"], "invalid int"),
])
def test_bad_input_is_one_line_exit_2(args, words):
    result = run_cli(*args)
    assert result.returncode == 2 and one_line(result.stderr) and words in result.stderr
    assert "Traceback" not in result.stderr


def test_not_our_directory_is_never_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_cli("--limit-files", 5, "--out", tmp_path, "--force")
    assert result.returncode == 2 and one_line(result.stderr) and (tmp_path / "precious.txt").exists()


# -----------------------------------------------------------------------------
# downloader against a local HTTP server (only 127.0.0.1 is ever contacted)

def fake_shard_bytes(n_tokens=40000, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, pd.GPT2_VOCAB_SIZE - 1, size=n_tokens).astype(np.uint16)
    tokens[::1000] = pd.GPT2_VOCAB_SIZE - 1  # documents of 1000 tokens, each preceded by <|endoftext|>
    header = np.zeros(pd.HEADER_INTS, dtype="<i4")
    header[:3] = pd.MAGIC, pd.VERSION, n_tokens
    return header.tobytes() + tokens.tobytes()


class ShardServer(http.server.BaseHTTPRequestHandler):
    """Serves /<mode>/<name> from `files`, honouring `Range: bytes=N-`. Modes:
    good; drop (the first response stops halfway); bad-magic; short (body shorter than the header says);
    error500 (always 500); hang (answers after a delay)."""

    files, requests, dropped = {}, [], set()

    def do_GET(self):
        _, mode, name = self.path.split("/", 2)
        self.requests.append((mode, name, self.headers.get("Range")))
        if mode == "error500":
            return self.send_error(500)
        if mode == "hang":
            time.sleep(3)
        if name not in self.files:
            return self.send_error(404)
        body = self.files[name]
        if mode == "bad-magic":
            body = b"<html>oops" + body[10:]
        elif mode == "short":
            body = body[:-2000]
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "drop" and name not in self.dropped:
            self.dropped.add(name)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up early (as they should on a bad header) are not errors here


@pytest.fixture
def server():
    ShardServer.files = {"finewebedu_val_000000.bin": fake_shard_bytes(30000, 1),
                         "finewebedu_train_000001.bin": fake_shard_bytes(300000, 2),
                         "finewebedu_train_000002.bin": fake_shard_bytes(40000, 3)}
    ShardServer.requests, ShardServer.dropped = [], set()
    httpd = QuietServer(("127.0.0.1", 0), ShardServer)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


NAME = "finewebedu_train_000001.bin"


def test_download_resumes_after_a_dropped_connection(server, tmp_path):
    dest = tmp_path / "train_000000.bin"
    pd.download_shard(f"{server}/drop/{NAME}", dest, pd.GPT2_VOCAB_SIZE, retries=3, backoff=0.01, timeout=5)
    assert dest.read_bytes() == ShardServer.files[NAME]
    ranges = [r for mode, name, r in ShardServer.requests]
    resumed_at = int(ranges[1].split("=")[1].rstrip("-"))
    assert ranges[0] is None and 0 < resumed_at <= len(ShardServer.files[NAME]) // 2  # kept what it had
    assert not list(tmp_path.glob("*.part"))


def test_download_resumes_an_existing_part_file(server, tmp_path):
    dest = tmp_path / "train_000000.bin"
    (tmp_path / "train_000000.bin.part").write_bytes(ShardServer.files[NAME][:5000])
    pd.download_shard(f"{server}/good/{NAME}", dest, pd.GPT2_VOCAB_SIZE, retries=0, timeout=5)
    assert dest.read_bytes() == ShardServer.files[NAME] and ShardServer.requests[0][2] == "bytes=5000-"


@pytest.mark.parametrize("mode", ["bad-magic", "short"])
def test_corrupted_download_is_rejected(server, tmp_path, mode):
    dest = tmp_path / "train_000000.bin"
    with pytest.raises(DataError) as info:
        pd.download_shard(f"{server}/{mode}/{NAME}", dest, pd.GPT2_VOCAB_SIZE, retries=1, backoff=0.01, timeout=5)
    assert "corrupted download rejected" in str(info.value) and one_line(info.value)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))
    assert len(ShardServer.requests) == 2


def test_retries_are_bounded_in_time(server, tmp_path):
    dest = tmp_path / "x.bin"
    started = time.time()
    with pytest.raises(DataError, match="gave up after 3 attempts: HTTP 500"):
        pd.download_shard(f"{server}/error500/{NAME}", dest, retries=2, backoff=0.05, timeout=5)
    assert len(ShardServer.requests) == 3
    with pytest.raises(DataError, match="gave up after 2 attempts: connection problem"):
        pd.download_shard(f"{server}/hang/{NAME}", dest, retries=1, backoff=0.05, timeout=0.5)
    with pytest.raises(DataError, match="HTTP 404"):  # not retried
        pd.download_shard(f"{server}/good/missing.bin", dest, retries=5, backoff=10, timeout=5)
    assert time.time() - started < 5 and not dest.exists()


def test_unreachable_server_says_offline(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as info:
        pd.download_shard(f"http://127.0.0.1:{port}/{NAME}", tmp_path / "x.bin", retries=1, backoff=0.01, timeout=2)
    assert "offline?" in str(info.value) and "--source local" in str(info.value) and one_line(info.value)


def test_fineweb_source_end_to_end(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pd, "load_gpt2_encoding", lambda: None)  # never fetch the GPT-2 vocabulary
    out = tmp_path / "fw"
    args = ["--source", "fineweb-edu", "--shards", "2", "--base-url", f"{server}/good", "--out", str(out)]
    assert pd.main(args) == 0
    meta = pd.load_meta(out)
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == 50256 and meta["tokenizer"] == "gpt2"
    assert [s["file"] for s in meta["splits"]["train"]["shards"]] == ["train_000000.bin", "train_000001.bin"]
    assert meta["splits"]["train"]["tokens"] == 340000 and meta["splits"]["val"]["documents"] == 30
    assert (out / "train_000001.bin").read_bytes() == ShardServer.files["finewebedu_train_000002.bin"]
    assert pd.token_byte_lengths(out) is None and "unavailable" in capsys.readouterr().err
    loader = pd.TrainLoader(out, 64, 64 * 4, 2)
    assert loader.batch(0, 1)[0].shape == (2, 64)
    n_requests = len(ShardServer.requests)
    assert pd.main(args) == 0 and len(ShardServer.requests) == n_requests  # ready: nothing fetched
    assert "ready" in capsys.readouterr().err


def test_loader_subset_repeats_a_fixed_set_of_windows(data_dir):
    full = pd.TrainLoader(data_dir, T, 4 * T, 2, seed=1)
    capped = pd.TrainLoader(data_dir, T, 4 * T, 2, seed=1, max_tokens=6 * T + 3)
    other_seed = pd.TrainLoader(data_dir, T, 4 * T, 2, seed=2, max_tokens=6 * T)
    assert capped.n_windows == 6 and capped.epochs_seen(3) == 2.0     # 3 steps x 4 windows / 6
    epoch = lambda loader, e: [w for s in range(3 * e, 3 * e + 3) for m in range(2)
                               for w in loader.window_indices(s, m)]
    first, second = epoch(capped, 0), epoch(capped, 1)
    assert len(set(first)) == 6 and set(first) == set(second)          # each window once per epoch
    assert set(first) == set(epoch(other_seed, 0))                      # the subset ignores the seed
    assert set(first) < set(range(full.n_windows))
    with pytest.raises(pd.DataError, match="windows"):
        pd.TrainLoader(data_dir, T, 4 * T, 2, max_tokens=T - 1)
