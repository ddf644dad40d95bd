"""Tests-only: the plain one-request decode loop over a decoder's functional `forward` (no engine), and the prompt's
embeddings, so decoder graphs can be checked against transformers on their own."""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import numpy as np

from skin_offline.runtime.decoder import Decoder
from skin_offline.runtime.prompt import Prompt


def embed_prompt(rt, ids: list[int], feats: np.ndarray) -> np.ndarray:
    """prompt ids with one IMAGE_PLACEHOLDER + [N,H] features -> [1, len(ids)-1+N, H] (the runtime's own splice)."""
    return Prompt.of(ids, feats.shape[0]).embeds(rt.bundle.embed, feats)[None]


def generate_step(
    decoder: Decoder,
    embeds: np.ndarray,
    embed: Callable,
    sampler: Callable[[np.ndarray], int],
    max_new_tokens: int,
    eos_id: int,
    cancel: threading.Event | None = None,
) -> Iterator[int]:
    """[1,S,H] prompt embeddings -> token ids: one prefill, then one KV-cached decode per token, stopping at EOS,
    max_new_tokens or cancel."""
    logits, cache = decoder.forward(embeds, decoder.empty_cache())  # prefill
    for n in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        token = sampler(logits[0, -1])
        yield token
        if token == eos_id or n + 1 == max_new_tokens:
            return
        logits, cache = decoder.forward(embed([token])[None], cache)  # [1,1,H] -> [1,1,V]


def gather(cache, rows: list[int]):
    """Batch rows of a functional cache, reordered / repeated (copies on the host)."""
    from skin_offline.runtime.kv import HostCache

    idx = np.asarray(rows, np.int64)
    return HostCache([k[idx] for k in cache.keys], [v[idx] for v in cache.values], cache.mask[idx])


def beam_with_decoder(decoder: Decoder, embeds: np.ndarray, embed: Callable, cfg, eos_id: int, tokenizer):
    """runtime/beam.py's search driven over a decoder's functional cache (no engine), so its rules can be checked
    with any stand-in EOS id: (tokens, finish reason, decoder runs after the prefill)."""
    from skin_offline.runtime.beam import BeamSearch

    search = BeamSearch(cfg, eos_id, tokenizer)
    logits, cache = decoder.forward(embeds, decoder.empty_cache())  # [1,1,V]
    step = search.start(logits[0, -1])
    while step.finish is None:
        if step.restart:  # every beam starts from the prompt
            cache = gather(cache, [0] * len(step.feed))
        elif step.parents is not None:
            cache = gather(cache, list(step.parents))  # a row gather, as the engine's slots do
        logits, cache = decoder.forward(embed(list(step.feed))[:, None], cache)  # [k,1,H] -> [k,1,V]
        step = search.step(logits[:, -1])
    return list(search.outcome().tokens), step.finish, search.steps


def label_logprobs_with_decoder(
    decoder: Decoder, embeds: np.ndarray, embed: Callable, labels_ids: list[list[int]]
) -> list[np.ndarray]:
    """Label scores as the runtime computed them before label scoring ran in the engine: one prefill over the
    decoder's functional cache, then every label's tokens teacher-forced after it, one label at a time."""
    from skin_offline.runtime.sampling import log_softmax

    logits, cache = decoder.forward(embeds, decoder.empty_cache())
    first = log_softmax(logits[0, -1])  # [V]
    out = []
    for ids in labels_ids:
        lps, rows = [first[ids[0]]], cache
        for j in range(len(ids) - 1):
            lg, rows = decoder.forward(embed([ids[j]])[None], rows)
            lps.append(log_softmax(lg[0, -1])[ids[j + 1]])
        out.append(np.array(lps))
    return out
