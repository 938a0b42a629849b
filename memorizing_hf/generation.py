"""Generation and streaming with persistent kNN memory.

A memorizing model reads inputs of any length through a `MemorizingCache`: local attention keeps a few attention
sinks and a window of recent tokens; tokens that leave the window are written to the kNN memory of the memory
layers. `generate()` sets this up, so prompts far longer than the window work at a bounded cost per token, and the
memory persists between calls: what one call read (prompt and output) is retrievable by the next.
`memorize()` streams documents into memory the same way, with a progress bar; so does a prompt of many windows
(transformers' `disable_progress_bar()` silences it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationMixin, logging

from ._compat import cache_kwargs, pop_cache, set_output_cache
from .cache import MemorizingCache

PROGRESS_CHUNKS = 8  # inputs of at least this many windows are read with a progress bar


class MemorizingGenerationMixin(GenerationMixin):
    """`generate`, `memorize` and the streaming forward pass of `MemorizingForCausalLM`."""

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, window: int | None = None, **kwargs: Any):
        """`GenerationMixin.generate` with a bounded local window and persistent memory.

        Args:
            window: tokens of local attention (besides the sinks); defaults to `config.local_window`. Longer prompts
                are read in chunks of this size and what leaves the window goes to memory.
            update_memory (`bool`, passed through to `forward`, defaults to `True`): write what leaves the window and,
                at the end, the rest of the window (but the sinks), so that the next call can retrieve every token it
                read: the prompt and the output but its last token, which `generate` never feeds back to the model.
                `False` leaves the memory exactly as it was.

        Beam search: the beams of a prompt share its memory row; the best beam writes for them. Everything else is
        as in transformers (sampling, streamers, `max_new_tokens`, batched left-padded prompts, ...).
        """
        cache = pop_cache(kwargs)
        if cache is None:
            generation_config = kwargs.get("generation_config") or self.generation_config
            beams = kwargs.get("num_beams") or generation_config.num_beams or 1
            cache = MemorizingCache(window or self.config.local_window, self.config.sink_tokens, beams=beams)
        output = super().generate(inputs, *args, **cache_kwargs(cache), **kwargs)
        if isinstance(cache, MemorizingCache) and kwargs.get("update_memory", True) and cache.sink_columns is not None:
            self._evict(cache, cache.columns - cache.sink_columns, write=True)
        return output

    @torch.no_grad()
    def memorize(
        self,
        documents: str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]],
        tokenizer: Any = None,
        window: int | None = None,
        progress: bool = True,
    ) -> dict[int, list[int]]:
        """Read documents into memory, one per batch row (row i of later `generate` calls reads document i).

        `documents`: a text or list of texts (with `tokenizer`), or token ids (`[rows, tokens]` tensor or lists).
        Each document is streamed through the local window; everything but its sink tokens ends up in memory.
        Returns the entries per row of each memory layer.
        """
        if isinstance(documents, str):
            documents = [documents]
        if isinstance(documents, torch.Tensor):
            rows = [row for row in documents.reshape(-1, documents.shape[-1]).tolist()]
        elif documents and isinstance(documents[0], str):
            if tokenizer is None:
                raise ValueError(
                    "memorize() got texts but no tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)."
                )
            rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
        else:
            rows = [list(row) for row in documents]
        if not rows or not all(rows):
            raise ValueError("memorize() needs at least one document, and every document needs at least one token.")
        length = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for index, row in enumerate(rows):  # right padding: every row starts with its own sink tokens
            input_ids[index, : len(row)] = torch.tensor(row)
            attention_mask[index, : len(row)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        cache = MemorizingCache(window or self.config.local_window, self.config.sink_tokens)
        step = cache.window
        for start in tqdm(range(0, length, step), desc="memorize", unit="chunk", disable=not progress):
            end = min(start + step, length)
            self(input_ids[:, start:end], attention_mask=attention_mask[:, :end], cache=cache, logits_to_keep=1)
        self._evict(cache, cache.columns - cache.sink_columns, write=True)
        return self.memory.entries()

    # -- streaming forward (called by `forward` when its cache is a MemorizingCache)
    def _stream_forward(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        attention_mask: torch.Tensor | None,
        cache: MemorizingCache,
        update_memory: bool,
        stats: dict[str, Any] | None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        """Read the new tokens in chunks of at most `cache.window`, evicting what leaves the window to memory
        (diagnostics go to `stats` if it is a dict)."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, tokens = reference.shape[:2]
        real = (
            attention_mask[:, -tokens:].bool()
            if attention_mask is not None
            else reference.new_ones(batch, tokens, dtype=torch.bool)
        )
        if cache.sink_columns is None:
            cache.start(real)
        beams = cache.beams
        if batch % beams:
            raise ValueError(f"A batch of {batch} rows cannot hold {beams} beams per prompt.")
        self.memory.check_batch_size(batch // beams)
        kwargs.pop("cache_position", None)  # logical positions of the full sequence: the cache is physical
        kwargs.pop("use_cache", None)
        outputs, logits = None, []
        chunks = range(0, tokens, cache.window)
        quiet = len(chunks) < PROGRESS_CHUNKS
        for start in logging.tqdm(chunks, desc="reading", unit="window", disable=quiet, leave=False):
            end = min(start + cache.window, tokens)
            chunk_real = real[:, start:end]
            chunk_ids = input_ids[:, start:end] if input_ids is not None else None
            positions = cache.next_positions(chunk_real)
            self._check_positions(positions)
            store = self._storable(chunk_ids, chunk_real)
            doc_positions = self.memory.document_positions(chunk_real[::beams]).repeat_interleave(beams, dim=0)
            window = chunk_real.sum(dim=1) + (cache.real.sum(dim=1) if cache.real is not None else 0)
            context = self._memory_context(positions, window, doc_positions, store, False, stats, beams=beams)
            outputs = self.language_model(
                input_ids=chunk_ids,
                inputs_embeds=inputs_embeds[:, start:end] if inputs_embeds is not None else None,
                attention_mask=cache.attention_mask(chunk_real),
                position_ids=positions,
                use_cache=True,
                memory_context=context,
                logits_to_keep=logits_to_keep if end == tokens else 1,
                **cache_kwargs(cache),
                **kwargs,
            )
            cache.append(chunk_real, store, doc_positions, positions)
            if update_memory:
                self.memory.advance(chunk_real[::beams])
            self._evict(cache, cache.overflow(), write=update_memory)
            logits.append(outputs.logits)
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            outputs.logits = torch.cat(logits, dim=1)
        set_output_cache(outputs, cache)
        return outputs

    def _evict(self, cache: MemorizingCache, count: int, write: bool) -> None:
        """Remove `count` columns after the sinks from the cache; write them to memory if `write`."""
        if count <= 0:
            return
        rotary = self._rotary()
        removed = cache.evict(count, rotary)
        if not write:
            return
        store = removed["storable"] & removed["real"]
        for layer, knn in self.knn_attention.items():
            keys, values = removed["layers"][int(layer)]
            knn.write(keys, values, removed["positions"], rotary, store, removed["doc_positions"], cache.beams)

    def _check_positions(self, positions: torch.Tensor) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and int(positions.max()) >= limit:
            raise ValueError(
                f"Streaming needs position {int(positions.max())} but the base model has {limit} positions. Use a "
                f"smaller window (window + chunk must stay below {limit}); models without rotary embeddings cannot "
                "stream beyond their positions."
            )
