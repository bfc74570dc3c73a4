"""Paged layout conversions against hand-computed expectations."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from registry.adapters import paged  # noqa: E402
from registry.errors import AdapterInputError  # noqa: E402

I32 = torch.int32


def t(values):
    return torch.tensor(values, dtype=I32)


def test_block_table_to_csr_hand_computed():
    # page_size 4: lens 5 -> 2 pages (last holds 1), 8 -> 2 pages (last full), 0 -> none, 1 -> 1 page
    block_table = t([[7, 3, 9], [2, 5, 0], [6, 6, 6], [4, 1, 1]])
    indptr, indices, last = paged.block_table_to_csr(block_table, t([5, 8, 0, 1]), 4)
    assert indptr.tolist() == [0, 2, 4, 4, 5]
    assert indices.tolist() == [7, 3, 2, 5, 4]
    assert last.tolist() == [1, 4, 0, 1]
    assert indptr.dtype == indices.dtype == last.dtype == I32


def test_num_pages_and_last_page_len_page_size_one():
    lens = t([0, 1, 3])
    assert paged.num_pages(lens, 1).tolist() == [0, 1, 3]
    assert paged.last_page_len(lens, 1).tolist() == [0, 1, 1]


def test_logical_to_slot_keeps_minus_one_and_follows_each_tokens_request():
    block_table = t([[7, 3], [2, 5]])
    # q_len 2: tokens 0,1 belong to request 0, tokens 2,3 to request 1
    idx = t([[0, 5, -1], [3, 4, 7], [0, 4, -1], [-1, -1, 6]])
    slots = paged.logical_to_slot(idx, block_table, 4, q_len=2)
    assert slots.tolist() == [[28, 13, -1], [31, 12, 15], [8, 20, -1], [-1, -1, 22]]
    assert slots.dtype == I32


def test_cu_seqlens_helpers():
    assert paged.cu_seqlens_from_lens(t([3, 0, 2])).tolist() == [0, 3, 3, 5]
    assert paged.lens_from_cu_seqlens(t([0, 3, 3, 5])).tolist() == [3, 0, 2]
    assert paged.uniform_cu_seqlens(3, 2).tolist() == [0, 2, 4, 6]
    assert paged.request_of_token(t([0, 3, 3, 5]), 5).tolist() == [0, 0, 0, 2, 2]


def test_check_paged_metadata_names_the_argument():
    with pytest.raises(AdapterInputError, match=r"^block_table: dtype int64 not in \[int32\]"):
        paged.check_paged_metadata(torch.zeros(2, 3, dtype=torch.int64), t([1, 1]))
    with pytest.raises(AdapterInputError, match=r"^seq_lens: shape \[3\] does not match \[2\]"):
        paged.check_paged_metadata(torch.zeros(2, 3, dtype=I32), t([1, 1, 1]))
    with pytest.raises(AdapterInputError, match=r"^seq_lens: a request holds 13 tokens but block_table rows address only 3 pages"):
        paged.check_paged_metadata(torch.zeros(2, 3, dtype=I32), t([1, 13]), 4)
    assert paged.check_paged_metadata(torch.zeros(2, 3, dtype=I32), t([1, 12]), 4) == 2


def test_check_cu_seqlens():
    assert paged.check_cu_seqlens("cu_seqlens_q", t([0, 2, 2, 5]), 3) == 5
    with pytest.raises(AdapterInputError, match=r"^cu_seqlens_q: offsets decrease"):
        paged.check_cu_seqlens("cu_seqlens_q", t([0, 3, 2]))
    with pytest.raises(AdapterInputError, match=r"^cu_seqlens_kv: must start at 0"):
        paged.check_cu_seqlens("cu_seqlens_kv", t([1, 3]))
    with pytest.raises(AdapterInputError, match=r"^cu_seqlens_q: shape \[3\] does not match \[4\]"):
        paged.check_cu_seqlens("cu_seqlens_q", t([0, 1, 2]), 3)
