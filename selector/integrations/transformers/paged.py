"""Continuous batching (``generate_batch``): the ``paged|NAME`` attention function (filled in below)."""

from __future__ import annotations

from typing import Any, Callable


def paged_attention_function(backend: Any) -> Callable:
    def paged_attention(module, query, key, value, attention_mask, **kwargs):
        raise NotImplementedError

    return paged_attention
