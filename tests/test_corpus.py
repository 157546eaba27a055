"""core/data/corpus.py: the story generator, the document split, the packed token bins and the
downloader's offline error."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from core.data.corpus import (DownloadError, TokenBins, download_tinystories, generate_stories, pack_documents,
                              split_documents, write_token_bin)


def test_same_seed_same_corpus_and_another_seed_another():
    assert generate_stories(50, seed=3) == generate_stories(50, seed=3)
    assert generate_stories(50, seed=3) != generate_stories(50, seed=4)
    # story i depends only on (seed, i): a longer corpus starts with the shorter one
    assert generate_stories(80, seed=3)[:50] == generate_stories(50, seed=3)


def test_toy_sized_corpus_is_a_few_hundred_kilobytes_of_varied_ascii_stories():
    stories = generate_stories(300, seed=0)
    size = sum(len(s.encode()) for s in stories)
    assert 100_000 <= size <= 300_000
    assert len(set(stories)) == len(stories)
    assert all(s.isascii() and s.count("\n") == 2 for s in stories)


def test_the_hero_keeps_its_name_and_the_friend_is_a_different_character():
    for story in generate_stories(100, seed=1):
        hero = re.search(r"named (\w+)\.", story).group(1)
        friend = re.search(r"friend (\w+),", story).group(1)
        assert hero != friend
        assert story.count(hero) >= 5 and story.count(friend) >= 4
        assert f'asked {hero}.' in story and f'said {friend}.' in story


def test_split_is_by_whole_document_and_deterministic():
    docs = generate_stories(200, seed=0)
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val


def test_pack_documents_ends_every_document_with_eos():
    packed = pack_documents([[5, 6], [], [7]], eos_id=1)
    assert packed.tolist() == [5, 6, 1, 1, 7, 1]


def test_token_bin_round_trips_as_uint16_and_refuses_ids_that_do_not_fit(tmp_path):
    ids = np.array([0, 1, 65535, 300])
    path = write_token_bin(ids, tmp_path / "train.bin")
    assert path.stat().st_size == 2 * len(ids)
    assert np.fromfile(path, dtype="<u2").tolist() == ids.tolist()
    with pytest.raises(ValueError, match="uint16"):
        write_token_bin([65536], tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()


@pytest.fixture
def bins(tmp_path):
    # token value == its position, so a window's first token says where it was cut
    write_token_bin(np.arange(1000), tmp_path / "train.bin")
    write_token_bin(np.arange(50), tmp_path / "val.bin")
    return TokenBins(tmp_path)


def test_batches_are_in_range_windows_with_targets_shifted_by_one(bins):
    block = 16
    x, y = bins.get_batch("train", 64, block, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, block) and x.dtype == y.dtype == torch.int64
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(block))   # a contiguous window of the file
    assert torch.equal(y, x + 1)                                    # y_t = x_{t+1}
    assert starts.min() >= 0 and (starts + block).max() <= 999     # the last target is in the file
    x_val, _ = bins.get_batch("val", 8, 49, torch.Generator().manual_seed(0))
    assert torch.equal(x_val, torch.arange(49).expand(8, 49))       # the only window that fits


def test_same_generator_state_gives_the_same_batch(bins):
    first = bins.get_batch("train", 8, 32, torch.Generator().manual_seed(7))
    again = bins.get_batch("train", 8, 32, torch.Generator().manual_seed(7))
    other = bins.get_batch("train", 8, 32, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_a_split_shorter_than_one_window_is_refused(bins):
    with pytest.raises(ValueError, match="block_size"):
        bins.get_batch("val", 1, 50, torch.Generator())


def test_download_offline_raises_a_clear_error_and_caches_nothing(tmp_path):
    with pytest.raises(DownloadError, match="internet") as info:
        download_tinystories(tmp_path, url="http://127.0.0.1:9/TinyStories-valid.txt", timeout=2)
    assert "source=generated" in str(info.value) and info.value.__cause__ is None
    assert not (tmp_path / "TinyStories-valid.txt").exists()
