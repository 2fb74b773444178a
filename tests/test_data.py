import gzip

import pytest
import torch

from kompakt.data import fashion_mnist, fashion_mnist_loader, wikitext2_windows
from kompakt.data.fashion_mnist import read_idx
from kompakt.errors import KompaktError


def test_fashion_mnist_test_split():
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05


def test_fashion_mnist_loader_batches():
    loader = fashion_mnist_loader("test", batch_size=256)
    x, y = next(iter(loader))
    assert x.shape == (256, 1, 28, 28) and y.shape == (256,)
    assert len(loader) == 40


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(KompaktError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)


def test_bad_idx_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(KompaktError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (100).to_bytes(4, "big") + b"\x01" * 10)
    with pytest.raises(KompaktError, match="truncated"):
        read_idx(short)


def test_unknown_split():
    with pytest.raises(KompaktError, match="no split 'val'"):
        fashion_mnist("val")


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_wikitext_windows_from_an_overridden_root(tmp_path, monkeypatch):
    (tmp_path / "valid.txt").write_text(" a b c d\n e f g\n zzz a\n")
    tokenizer = word_tokenizer(list("abcdefg"))
    windows = wikitext2_windows(tokenizer, "valid", window=4, root=tmp_path)
    # ids: a=1 ... g=7, unknown words -> 0; 10 tokens -> two full windows, the rest dropped
    assert windows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    monkeypatch.setenv("KOMPAKT_WIKITEXT2", str(tmp_path))
    assert wikitext2_windows(tokenizer, "valid", window=3, max_windows=1).tolist() == [[1, 2, 3]]
    with pytest.raises(KompaktError, match=r"test\.txt: missing"):
        wikitext2_windows(tokenizer, "test", window=3)
    with pytest.raises(KompaktError, match="no split 'train'"):
        wikitext2_windows(tokenizer, "train")


def test_shared_wikitext_splits_are_found():
    tokenizer = word_tokenizer(["the", "of", "and"])
    windows = wikitext2_windows(tokenizer, "test", window=512, max_windows=3)
    assert windows.shape == (3, 512)
    assert (windows == 1).sum() > 10  # "the" is common in real English text
