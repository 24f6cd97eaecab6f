"""Loader, split, list examples, download, and one-line CLI errors."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import EOS_ID, SEP_ID, TokenLayout
from padrec_vllm.cli import main
from padrec_vllm.data.download import download
from padrec_vllm.train.examples import collate, list_examples
from padrec_vllm.data.s3rec import leave_one_out, load_dataset
from padrec_vllm.errors import UserError
from synthetic import NAME, write_synthetic

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"


def test_leave_one_out():
    split = leave_one_out({1: [1, 2, 3, 4, 5], 2: [7, 8]})
    assert (
        split.train[1] == [1, 2, 3]
        and split.valid[1] == ([1, 2, 3], 4)
        and split.test[1] == ([1, 2, 3, 4], 5)
    )
    assert 2 not in split.test and split.train[2] == [7, 8]


def test_list_examples_eos_only_on_full_lists():
    layout = TokenLayout((4, 4, 4, 1))
    cat = Catalog(layout, {i: (i % 4, (i // 4) % 4, i // 16, 0) for i in range(1, 20)})
    ex = list_examples({1: [1, 2, 3, 4, 5]}, cat, history=2, list_len=3)
    assert len(ex) == 4
    assert (
        ex[0].completion[-1] == EOS_ID and ex[0].completion.count(SEP_ID) == 3
    )  # t=1: 3 of 3 items
    assert ex[-1].completion[-1] == SEP_ID  # t=4: only 1 item left, cut by the data, no <eos>
    assert ex[-1].prompt == tuple(cat.prompt_ids([3, 4], 2))
    batch = collate(ex[:2])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][0, : len(ex[0].prompt)] == -100).all()


def test_loader_errors_name_the_file(tmp_path):
    root = write_synthetic(tmp_path, with_meta=False)
    ds = load_dataset(NAME, root)
    assert ds.num_items == 96 and not ds.has_text
    (root / NAME / f"{NAME}_item2attributes.json").write_text("{not json")
    with pytest.raises(UserError, match=f"{NAME}_item2attributes.json"):
        load_dataset(NAME, root)
    (root / NAME / f"{NAME}_item2attributes.json").unlink()
    with pytest.raises(UserError, match="missing data file.*item2attributes"):
        load_dataset(NAME, root)
    (root / NAME / f"{NAME}.txt").write_text("1 2 3\n2 x 4\n")
    with pytest.raises(UserError, match=f"line 2 in .*{NAME}.txt"):
        load_dataset(NAME, root)


@pytest.mark.skipif(not (SHARED / "Beauty").is_dir(), reason="needs ../shared/data")
def test_real_beauty_loads():
    ds = load_dataset("Beauty")
    assert len(ds.sequences) == 22363 and ds.num_items == 12101 and ds.has_text


@pytest.fixture()
def http_root(tmp_path):
    """Serve a folder on loopback; yields (folder, base url)."""
    folder = tmp_path / "srv"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.skipif(not (SHARED / "Beauty").is_dir(), reason="needs ../shared/data")
def test_download_checks_sha256(http_root, tmp_path):
    folder, url = http_root
    for name in ("Beauty.txt", "Beauty_item2attributes.json"):
        shutil.copy(SHARED / "Beauty" / name, folder / name)
    written = download("Beauty", tmp_path / "dl", url)
    assert sorted(p.name for p in written) == ["Beauty.txt", "Beauty_item2attributes.json"]
    assert (tmp_path / "dl/Beauty/Beauty.txt").read_bytes() == (
        SHARED / "Beauty/Beauty.txt"
    ).read_bytes()
    assert download("Beauty", tmp_path / "dl", url) == []  # already there and verified
    (folder / "Beauty.txt").write_text("1 2 3\n")  # corrupt copy on the server
    with pytest.raises(UserError, match="checksum mismatch for Beauty.txt"):
        download("Beauty", tmp_path / "dl2", url)
    assert not (tmp_path / "dl2/Beauty/Beauty.txt").exists()
    with pytest.raises(UserError, match="download of .*Beauty_item2attributes.json failed"):
        (folder / "Beauty.txt").write_bytes((SHARED / "Beauty/Beauty.txt").read_bytes())
        (folder / "Beauty_item2attributes.json").unlink()
        download("Beauty", tmp_path / "dl3", url)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["build", "--dataset", "Beauty", "--out", "x", "--preset", "huge"],
            "invalid choice: 'huge'",
        ),
        (  # an existing data folder (this one) without the dataset's folder in it
            ["build", "--dataset", "Nope", "--out", "x", "--data-dir", str(Path(__file__).parent)],
            "dataset folder not found",
        ),
        (["eval", "--artifacts", "/nonexistent"], "not an artifacts directory"),
        (["eval", "--artifacts", "x", "--users", "-3"], "expected a positive integer"),
        (["build", "--dataset", "Beauty", "--out", "x", "--device", "tpu"], "expected cpu or cuda"),
        (["data", "download", "Nope"], "unknown dataset 'Nope'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_data_file(tmp_path, capsys):
    root = write_synthetic(tmp_path)
    (root / NAME / f"{NAME}.txt").unlink()
    assert (
        main(["prepare", "--dataset", NAME, "--data-dir", str(root), "--out", str(tmp_path / "a")])
        == 2
    )
    err = capsys.readouterr().err
    assert f"missing data file: {root / NAME / NAME}.txt" in err and err.count("\n") == 1
