"""Shard sets at URLs: fsspec helpers over ``file://``, and a real HTTP server on 127.0.0.1
serving real digits shards (whole, cut, or dropped mid-transfer) to the streams, to
``prepare_data`` and to a 2-worker Ray run."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data import fs
from distnoisy.data.noise import load_label_file, save_label_file
from distnoisy.data.prepare import prepare_data
from distnoisy.data.shards import Manifest, read_labels, read_manifest, shard_list_dir
from distnoisy.data.stream import EvalStream, TrainStream, make_transform
from distnoisy.train import main, train

IDENTITY = make_transform("digits", [0.0], [1.0])


class _Handler(SimpleHTTPRequestHandler):
    """Static files; records requests; can drop a file's connection half way through."""

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path))
        super().do_HEAD()

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        if any(self.path.startswith(p) for p in self.server.no_index) and self.path.endswith("/"):
            self.send_error(404)  # a server without directory indexes
            return
        if self.path in self.server.drop:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # then the connection closes
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def served(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the server serves: digits as is, and damaged or re-arranged copies."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(digits_root / "train", root / "digits" / "train")
    shutil.copytree(digits_root / "test", root / "digits" / "test")
    for name in ("cut", "drop", "holes", "plain"):
        shutil.copytree(digits_root / "train", root / name / "train")
    shard = root / "cut" / "train" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    (root / "holes" / "train" / "train-000001.tar").unlink()
    # A converter's layout for cifar/clothing1m (digits sets stand in for their splits).
    for split, src in (("noisy_train", "train"), ("clean_val", "test"), ("clean_test", "test")):
        shutil.copytree(digits_root / src, root / "c1m" / split)
    return root


@pytest.fixture(scope="module")
def server(served: Path) -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(served))
    )
    httpd.requests, httpd.drop, httpd.no_index = [], {"/drop/train/train-000003.tar"}, {"/plain/"}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# fs helpers over file:// (fsspec's LocalFileSystem)


def test_urls_and_paths_are_told_apart_and_joined() -> None:
    assert fs.is_url("s3://bucket/set") and fs.is_url("file:///tmp/x") and fs.is_url("gs://b")
    assert not fs.is_url("/data/set") and not fs.is_url("data/set") and not fs.is_url("C:\\set")
    assert fs.join("s3://b/c1m/", "train", "manifest.json") == "s3://b/c1m/train/manifest.json"
    assert fs.join("/data", "train") == str(Path("/data/train"))
    assert fs.basename("https://h/a/train-000001.tar") == "train-000001.tar"
    assert fs.parent("https://h/a/train-000001.tar") == "https://h/a"
    assert fs.parent("/data/a/x.tar") == str(Path("/data/a"))


def test_brace_patterns_and_comma_lists_expand_in_order() -> None:
    assert fs.expand("s3://b/t-{000000..000002}.tar") == [
        "s3://b/t-000000.tar",
        "s3://b/t-000001.tar",
        "s3://b/t-000002.tar",
    ]
    assert fs.expand("a.tar, b-{1,2}.tar ,c.tar") == ["a.tar", "b-1.tar", "b-2.tar", "c.tar"]
    assert fs.expand("s3://b/set") == ["s3://b/set"]
    with pytest.raises(ConfigError, match=r"t-\{0"):
        fs.expand("t-{0..2.tar")


def test_file_urls_read_list_and_report_missing_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00\x01abc")
    (tmp_path / "sub").mkdir()
    base = tmp_path.as_uri()
    assert fs.read_bytes(f"{base}/a.bin") == b"\x00\x01abc"
    with fs.open_binary(f"{base}/a.bin") as f:
        assert f.read(2) == b"\x00\x01" and f.read() == b"abc"
    assert fs.is_file(f"{base}/a.bin") and not fs.is_file(f"{base}/sub")
    assert not fs.is_file(f"{base}/nothing")
    assert fs.list_names(base) == fs.list_names(tmp_path) == {"a.bin", "sub"}
    for read in (fs.read_bytes, fs.open_binary):
        with pytest.raises(FileNotFoundError):
            read(f"{base}/nothing")
    with pytest.raises(ConfigError, match="nosuch:// is not a protocol fsspec knows"):
        fs.read_bytes("nosuch://x/y")


@pytest.mark.slow
def test_unreachable_host_is_one_line_naming_url_and_reason() -> None:
    where = f"http://127.0.0.1:{closed_port()}/set/manifest.json"
    for call in (fs.read_bytes, fs.open_binary, fs.is_file, fs.list_names):
        with pytest.raises(DataError) as err:
            call(where)
        msg = str(err.value)
        assert msg.startswith(f"cannot read {where}: ") and "\n" not in msg
        assert "Cannot connect" in msg or "refused" in msg.lower(), msg


@pytest.mark.skipif(
    importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed: nothing is missing"
)
def test_s3_without_s3fs_says_what_to_install() -> None:
    with pytest.raises(ConfigError) as err:
        fs.check_backend("s3://bucket/c1m-wds", "data.urls")
    assert str(err.value) == (
        "data.urls=s3://bucket/c1m-wds needs the s3fs package: pip install 'distnoisy[s3]'"
    )
    with pytest.raises(ConfigError, match="needs the s3fs package"):
        read_manifest("s3://bucket/c1m-wds/noisy_train")


# ----------------------------------------------------------------------------------------------
# manifests, label tables and shard lists at URLs


def test_manifest_and_labels_read_the_same_through_a_url(digits_root: Path) -> None:
    local = read_manifest(digits_root / "train")
    for where in ((digits_root / "train").as_uri(), (digits_root / "train").as_uri() + "/"):
        remote = read_manifest(where)
        assert remote.root == (digits_root / "train").as_uri()
        assert remote.shards == local.shards and remote.num_samples == local.num_samples
        assert remote.urls == [f"{remote.root}/{s.name}" for s in local.shards]
    for a, b in zip(read_labels(local), read_labels(remote), strict=True):
        assert np.array_equal(a, b)
    assert read_manifest(f"{remote.root}/manifest.json") == remote


def test_remote_missing_shards_are_found_with_one_listing(
    server: ThreadingHTTPServer, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.requests.clear()
    assert read_manifest(f"{url}/digits/train").num_samples == 1437
    # The manifest, then the directory (http.server redirects to the trailing slash): no
    # request per shard.
    assert server.requests == [
        ("GET", "/digits/train/manifest.json"),
        ("GET", "/digits/train"),
        ("GET", "/digits/train/"),
    ]
    with pytest.raises(DataError, match=r"missing: http://.*/holes/train/train-000001\.tar$"):
        read_manifest(f"{url}/holes/train")
    # A server without directory indexes: nothing to check against, said so, not an error.
    with caplog.at_level(logging.INFO, logger="distnoisy.data.shards"):
        assert read_manifest(f"{url}/plain/train").num_samples == 1437
    assert "cannot list" in caplog.text and "recorded as bad data" in caplog.text


def test_no_manifest_at_a_url_names_it(url: str) -> None:
    with pytest.raises(DataError, match=f"no manifest.json at {url}/nothing ") as err:
        read_manifest(f"{url}/nothing")
    assert "\n" not in str(err.value)


def test_a_shard_list_must_be_the_whole_set(url: str, digits_root: Path) -> None:
    remote = f"{url}/digits/train"
    names = [f"{remote}/train-{i:06d}.tar" for i in range(6)]
    assert shard_list_dir(fs.expand(f"{remote}/train-{{000000..000005}}.tar"), "x") == remote
    assert shard_list_dir(names[::-1], "x") == remote  # any order
    local = digits_root / "train"
    assert shard_list_dir([str(local / f"train-{i:06d}.tar") for i in range(6)], "x") == str(local)
    with pytest.raises(DataError) as err:
        shard_list_dir(names[:4], "data.urls=P")
    msg = str(err.value)
    assert msg.startswith("data.urls=P must name exactly the 6 shards of ")
    assert "missing: train-000004.tar, train-000005.tar" in msg and msg.endswith(remote)
    with pytest.raises(DataError, match=r"not in the manifest: train-000009\.tar; listed twice"):
        shard_list_dir([*names, f"{remote}/train-000009.tar", names[0]], "x")
    with pytest.raises(DataError, match="lie in 2 directories"):
        shard_list_dir([names[0], f"{url}/cut/train/train-000001.tar"], "x")
    with pytest.raises(DataError, match=r"manifest\.json is not a \.tar shard"):
        shard_list_dir([names[0], f"{remote}/manifest.json"], "x")


def test_label_files_can_be_urls(tmp_path: Path) -> None:
    labels, clean = np.array([2, 0, 1, 1]), np.array([2, 0, 1, 0])
    save_label_file(tmp_path / "l.parquet", labels, clean, {})
    (tmp_path / "l.csv").write_text("index,label\n1,0\n0,2\n2,1\n3,1\n")
    np.save(tmp_path / "l.npy", labels)
    for name in ("l.parquet", "l.csv", "l.npy"):
        lf = load_label_file((tmp_path / name).as_uri(), 4, 3)
        assert lf.labels.tolist() == labels.tolist(), name
    with pytest.raises(DataError, match="does not exist"):
        load_label_file((tmp_path / "none.csv").as_uri(), 4, 3)


# ----------------------------------------------------------------------------------------------
# streams over HTTP


def _train(m: Manifest, rank: int, num_workers: int = 0, split: str = "sample") -> TrainStream:
    return TrainStream(
        m,
        rank=rank,
        world_size=2,
        local_batch_size=50,
        seed=3,
        split=split,
        transform=IDENTITY,
        shuffle_buffer=100,
        num_workers=num_workers,
    )


def _epochs(stream: TrainStream, epochs: int = 2) -> list[list[dict[str, torch.Tensor]]]:
    try:
        return [list(stream.epoch_batches(e)) for e in range(epochs)]
    finally:
        stream.close()


def _assert_same(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        assert len(ea) == len(eb)
        for x, y in zip(ea, eb, strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])


@pytest.mark.parametrize("num_workers,ranks", [(0, (0, 1)), (2, (1,))])
def test_train_stream_over_http_equals_local(
    url: str, digits_root: Path, num_workers: int, ranks: tuple[int, ...]
) -> None:
    local, remote = read_manifest(digits_root / "train"), read_manifest(f"{url}/digits/train")
    for rank in ranks:
        # num_workers=0 vs 2 locally is test_stream's business: the local side stays in-process.
        expected = _epochs(_train(local, rank, split="shard"))
        got = _epochs(_train(remote, rank, num_workers, split="shard"))
        assert len(got[0]) == 1437 // 100
        _assert_same(expected, got)


def test_eval_stream_over_http_equals_local(url: str, digits_root: Path) -> None:
    for split in ("train", "test"):
        local, remote = read_manifest(digits_root / split), read_manifest(f"{url}/digits/{split}")
        for rank in (0, 1):
            a = EvalStream(local, rank=rank, world_size=2, batch_size=64, transform=IDENTITY)
            b = EvalStream(remote, rank=rank, world_size=2, batch_size=64, transform=IDENTITY)
            _assert_same([list(a.batches())], [list(b.batches())])
            assert b.bad_samples == []


def test_a_truncated_shard_over_http_is_bad_data_like_on_disk(url: str, served: Path) -> None:
    local, remote = read_manifest(served / "cut" / "train"), read_manifest(f"{url}/cut/train")
    for rank in (0, 1):
        a, b = _train(local, rank), _train(remote, rank)
        _assert_same(_epochs(a), _epochs(b))
        assert b.bad_samples == a.bad_samples
        assert {k for k, _ in b.bad_samples} == {"train-000002.tar"}


def test_a_dropped_connection_is_bad_data_and_ranks_stay_equal(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server drops this shard's connection half way every time: each read is retried
    # (from where it stopped) once, then the shard is bad data.
    monkeypatch.setenv("DISTNOISY_READ_RETRIES", "1")
    remote = read_manifest(f"{url}/drop/train")
    streams = [_train(remote, rank) for rank in (0, 1)]
    for s in streams:
        assert [len(e) for e in _epochs(s)] == [14, 14]
        reasons = [why for k, why in s.bad_samples if k == "train-000003.tar"]
        assert any("of 256 samples" in why for why in reasons), s.bad_samples
        assert any("RemoteReadError: 2 tries failed" in why for why in reasons), s.bad_samples
        assert any("IncompleteRead" in why for why in reasons), s.bad_samples
        assert {k for k, _ in s.bad_samples} == {"train-000003.tar"}


# ----------------------------------------------------------------------------------------------
# data.urls / data.root in runs


def test_patterns_and_siblings_resolve_and_noise_stays_local(
    url: str, served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.relative_to(served) for p in served.rglob("*"))
    pattern = f"{url}/c1m/noisy_train/train-{{000000..000005}}.tar"
    spec = prepare_data(
        load_config(["data.name=clothing1m", f"data.urls={pattern}", "noise.kind=none"])
    )
    assert (spec.train_dir, spec.val_dir, spec.test_dir) == (
        f"{url}/c1m/noisy_train",
        f"{url}/c1m/clean_val",
        f"{url}/c1m/clean_test",
    )
    assert (
        prepare_data(
            load_config(["data.name=clothing1m", f"data.root={url}/c1m", "noise.kind=none"])
        )
        == spec
    )
    # Synthetic noise of a remote set: into data.root when it is local ...
    cache = tmp_path / "cache"
    args = ["data.name=shards", f"data.urls={url}/digits", "noise.rate=0.4"]
    spec = prepare_data(load_config([*args, f"data.root={cache}"]))
    assert spec.test_dir == f"{url}/digits/test" and spec.noise_rate == pytest.approx(0.4, abs=0.05)
    assert Path(spec.label_file).parent == cache / "noise"
    # ... else into a per-URL cache under the home directory, never into the bucket.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = prepare_data(load_config(args))
    where = Path(spec.label_file).parent
    assert where.parent.parent == tmp_path / "home" / ".cache" / "distnoisy" / "remote"
    assert len(where.parent.name) == 12 and where.name == "noise"
    assert sorted(p.relative_to(served) for p in served.rglob("*")) == before


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_urls_fail_in_one_line_before_the_run_dir(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    base = ["data.name=shards", f"output_dir={out}", "tracking.enabled=false"]
    err = _error_line(capsys, [*base, f"data.urls={url}/nothing"])
    assert f"no manifest.json at {url}/nothing " in err
    dead = f"http://127.0.0.1:{closed_port()}/set"
    err = _error_line(capsys, [*base, f"data.urls={dead}"])
    assert f"cannot read {dead}/train/manifest.json: ClientConnectorError" in err
    err = _error_line(capsys, [*base, f"data.urls={url}/digits/train/train-{{000000..000003}}.tar"])
    assert "missing: train-000004.tar, train-000005.tar" in err and f"{url}/digits/train" in err
    if importlib.util.find_spec("s3fs") is None:
        err = _error_line(capsys, [*base, "data.urls=s3://bucket/c1m-wds"])
        assert err.endswith(
            "data.urls=s3://bucket/c1m-wds needs the s3fs package: pip install 'distnoisy[s3]'"
        )
    assert not out.exists()


@pytest.mark.slow
def test_two_ray_workers_train_on_shards_served_over_http(
    url: str, digits_root: Path, tmp_path: Path, ray_cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = [
        "data.name=shards",
        "data.split=sample",
        "train.epochs=3",
        "seed=7",
        "scaling.num_workers=2",
        "tracking.enabled=false",
    ]
    remote = train(
        load_config(
            [
                *common,
                f"data.urls={url}/digits",
                f"data.root={tmp_path / 'cache'}",
                f"output_dir={tmp_path / 'http'}",
            ]
        )
    )
    # The reference: the same 2-rank DDP job on the local path, without Ray. One thread per
    # process as in Ray's workers, so that the float results are comparable to the last bit.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local = train(
        load_config(
            [
                *common,
                f"data.urls={digits_root}",
                "scaling.launcher=local",
                f"output_dir={tmp_path / 'local'}",
            ]
        )
    )
    assert set(remote) == set(local)
    assert remote["epochs"] == 3 and remote["num_workers"] == 2 and remote["num_train"] == 1437
    losses = [h["train_loss"] for h in remote["history"]]
    assert losses == sorted(losses, reverse=True)  # it trains
    # Same data, same order, same labels: the same numbers (measured: equal to the last bit).
    assert losses == pytest.approx([h["train_loss"] for h in local["history"]], abs=1e-9)
    for key in ("test_acc", "best_test_acc", "memorized", "label_issue_auroc"):
        assert remote[key] == pytest.approx(local[key], abs=1e-9), key
    assert remote["noise_rate_realised"] == local["noise_rate_realised"]
    assert remote["bad_samples"] == 0
    saved = json.loads((tmp_path / "http" / "summary.json").read_text())
    assert saved["test_acc"] == remote["test_acc"]
    assert list((tmp_path / "cache" / "noise").glob("noise-digits-train-*.parquet"))


# ----------------------------------------------------------------------------------------------
# the retry budget of one shard read


class _ChunkHandler(SimpleHTTPRequestHandler):
    """``server.body`` from the requested ``Range`` on, ``server.chunk`` bytes per GET, after
    which the connection closes (a server that keeps failing part way)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body, start = self.server.body, 0
        self.server.gets += 1
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start : start + self.server.chunk])
        self.close_connection = True


@pytest.fixture
def chunk_server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkHandler)
    httpd.body = np.random.default_rng(0).bytes(5 << 20)
    httpd.gets = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _read_all(url: str) -> bytes:
    from distnoisy.data.remote import RetryingHTTPReader

    with RetryingHTTPReader(url).open() as reader:
        return reader.read()


@pytest.mark.parametrize("chunk_kb, gets", [(1536, 4), (64, 3)])
def test_tries_start_afresh_only_after_real_progress(chunk_server, monkeypatch, chunk_kb, gets):
    """A stream that fails after every 1.5 MiB goes on (the tries count again after 1 MiB of
    progress); one that brings 64 KiB a GET is given up after retries + 1 GETs, as a stall
    would be, instead of being followed for as many tries as it has bytes (5 MiB / 64 KiB)."""
    from distnoisy.data import remote

    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    monkeypatch.setenv("DISTNOISY_READ_RETRIES", "2")
    chunk_server.chunk = chunk_kb << 10
    url = f"http://127.0.0.1:{chunk_server.server_address[1]}/shard.tar"
    if chunk_kb > 1024:
        assert _read_all(url) == chunk_server.body
    else:
        with pytest.raises(remote.RemoteReadError, match="3 tries failed at byte 196608"):
            _read_all(url)
    assert chunk_server.gets == gets
