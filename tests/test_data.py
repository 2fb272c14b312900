"""MNIST and SST-2 reading and downloading, on the real files and a real local HTTP server."""

from __future__ import annotations

import gzip
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from readers.download import DataError, RemoteFile, fetch
from readers.mnist import load_mnist, read_idx
from readers.sst2 import load_sst2, read_tsv


def test_load_mnist_reads_the_shared_split(data_dir: Path) -> None:
    train, test = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    assert train.images.shape == (8000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (2000, 28, 28) and len(test.labels) == 2000
    assert set(np.unique(train.labels)) == set(range(10))
    assert all(len(h) == 64 for h in test.files.values())


def test_read_idx_accepts_plain_files(data_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((data_dir / "mnist/t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(plain), read_idx(data_dir / "mnist/t10k-labels-idx1-ubyte.gz"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", r"declares shape \(5,\)"),
        (b"\x12\x34\x08\x01", "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00", "unsupported"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(bad)


def test_missing_file_without_download_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found in .*mnist"):
        load_mnist(tmp_path, "test")


def published_sha256(data_dir: Path) -> dict[str, str]:
    lines = (data_dir / "SHA256SUMS").read_text().splitlines()
    return {path.split("/")[-1]: digest for digest, path in (ln.split() for ln in lines if ln)}


def test_fetch_verifies_and_keeps_a_good_file(http_mirror, data_dir: Path, tmp_path: Path) -> None:
    url, root = http_mirror
    name = "t10k-labels-idx1-ubyte.gz"
    shutil.copy(data_dir / "mnist" / name, root / name)
    checksum = "sha256:" + published_sha256(data_dir)[name]
    path = fetch(RemoteFile(name, url + name, checksum), tmp_path / "got", progress=False)
    assert path.read_bytes() == (data_dir / "mnist" / name).read_bytes()
    assert read_idx(path).shape == (2000,)


def test_mnist_download_insists_on_the_official_files(
    http_mirror, data_dir: Path, tmp_path: Path
) -> None:
    url, root = http_mirror
    # The shared t10k files are a re-split, not the official files: their MD5 differs.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(data_dir / "mnist" / name, root / name)
    with pytest.raises(DataError, match="checksum mismatch .* expected md5 9fb629c4"):
        load_mnist(tmp_path / "data", "test", base_url=url)


def test_download_discards_a_tampered_file(http_mirror, data_dir: Path, tmp_path: Path) -> None:
    url, root = http_mirror
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not the real file")
    target = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist(target, "test", base_url=url)
    assert list((target / "mnist").iterdir()) == []  # nothing half-written is kept


def test_download_offline_says_where_to_put_the_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Put the file at .*t10k-images"):
        load_mnist(tmp_path, "test", base_url="http://127.0.0.1:9/")


def test_load_sst2_reads_the_shared_glue_files(data_dir: Path) -> None:
    train, dev = load_sst2(data_dir, "train"), load_sst2(data_dir, "dev")
    assert len(train.texts) == 67349 and len(dev.texts) == 872
    assert int(dev.labels.sum()) == 444 and set(np.unique(train.labels)) == {0, 1}
    assert dev.texts[0] == "one long string of cliches ." and dev.labels[0] == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("text\tlabel\nfine\t1\n", r":1: .*header 'sentence<TAB>label'"),
        ("sentence\tlabel\ngood film\t1\nno label here\n", r":3: expected 2 tab-separated fields"),
        ("sentence\tlabel\ngood film\t1\nbad film\tneg\n", r":3: label must be 0 or 1, got 'neg'"),
        ("sentence\tlabel\n \t0\n", r":2: empty sentence"),
        ("sentence\tlabel\n", r"no examples after the header"),
    ],
)
def test_read_sst2_tsv_names_the_malformed_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "train.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_tsv(path)


def glue_archive(data_dir: Path, path: Path) -> Path:
    """A zip laid out as GLUE's SST-2.zip, from the shared files."""
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "dev"):
            z.write(data_dir / "sst2" / f"{split}.tsv", f"SST-2/{split}.tsv")
    return path


def test_sst2_archive_in_the_folder_is_unpacked(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    glue_archive(data_dir, folder / "SST-2.zip")
    dev = load_sst2(tmp_path / "data", "dev", url="http://127.0.0.1:9/SST-2.zip")
    assert len(dev.texts) == 872
    assert (folder / "dev.tsv").read_bytes() == (data_dir / "sst2" / "dev.tsv").read_bytes()


def test_sst2_download_insists_on_the_official_archive(
    http_mirror, data_dir: Path, tmp_path: Path
) -> None:
    url, root = http_mirror
    glue_archive(data_dir, root / "SST-2.zip")  # same files, but not the official zip bytes
    with pytest.raises(DataError, match="checksum mismatch .* expected md5 9f81648d"):
        load_sst2(tmp_path / "data", "dev", url=url + "SST-2.zip")
    assert list((tmp_path / "data" / "sst2").iterdir()) == []


def test_sst2_offline_says_where_to_put_the_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Put the file at .*sst2/SST-2.zip"):
        load_sst2(tmp_path, "dev", url="http://127.0.0.1:9/SST-2.zip")
