"""Generation and reading with a persistent kNN memory.

A memorizing model reads inputs of any length through a `MemorizingCache`: local attention keeps a few attention
sinks and a window of recent tokens; tokens that leave the window go to the cache's own memory, which the memory
layers read beside the model's memory. So a prompt far longer than the window works at a bounded cost per token.

Which memory a call uses is explicit (`memory=`, by default `model.memory`), and so is whether it changes it:
- `memorize(documents)` reads documents into memory, one per row: what a later call retrieves from.
- `generate(prompts)` reads the memory and leaves it exactly as it was (pipelines and batches of independent prompts
  never see each other); `generate(..., update_memory=True)` also writes everything the call read (prompt and
  output) into it, so that the next call can retrieve it.
Rows: a prompt reads the memory row of the same index, or the only row of a one-row memory; the sequences generated
from one prompt (beams, `num_return_sequences`) share its row. Long inputs are read with a progress bar
(transformers' `disable_progress_bar()` silences it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationMixin, logging

from ._compat import cache_kwargs, pop_cache
from .cache import MemorizingCache

logger = logging.get_logger(__name__)


class MemorizingGenerationMixin(GenerationMixin):
    """`generate` and `memorize` of `MemorizingForCausalLM`."""

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *args: Any,
        window: int | None = None,
        memory: Any = None,
        update_memory: bool = False,
        **kwargs: Any,
    ):
        """`GenerationMixin.generate` with a bounded local window and a kNN memory.

        Args:
            window: tokens of local attention (besides the sinks); defaults to `config.local_window`. Longer prompts
                are read in chunks of this size and what leaves the window stays retrievable for the rest of the call.
            memory: the `MemoryBank` to read (default `model.memory`).
            update_memory: also write everything this call read (the prompt and the output but its last token, which
                `generate` never feeds back, sinks excepted) into `memory`, row by row, so that a later call
                retrieves it. With several sequences per prompt, the first one writes for the prompt. False (default):
                `memory` stays exactly as it was.
            cache: a `MemorizingCache` (`model.new_cache()`) to continue: `generate` reads only the tokens of the
                prompt it has not read yet, so a resent chat history is read once; `update_memory=True` moves what
                it read, its window included, into `memory`. An empty `DynamicCache` is replaced by a
                `MemorizingCache`.

        Everything else is as in transformers: greedy, sampling, beam search, `num_return_sequences`, assisted
        decoding, streamers, left-padded batches. `use_cache=False` changes nothing: the window cache is how a
        memorizing model reads.
        """
        memory = self.memory if memory is None else memory
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams") or config.num_beams or 1
        per_prompt = beams if beams > 1 else kwargs.get("num_return_sequences") or config.num_return_sequences or 1
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        prompts = prompt.shape[0] if prompt is not None else 1
        self._memory_group(memory, prompts * per_prompt, per_prompt)  # refuses an ambiguous layout before reading
        if update_memory and memory.num_rows not in (0, prompts):
            raise ValueError(
                f"update_memory=True writes one memory row per prompt, but the memory holds {memory.num_rows} rows "
                f"and this call has {prompts} prompts."
            )
        cache = pop_cache(kwargs)
        if cache is None or (not isinstance(cache, MemorizingCache) and cache.get_seq_length() == 0):
            cache = self.new_cache(window, memory, per_prompt)
        elif not isinstance(cache, MemorizingCache):
            raise ValueError(
                f"generate() got a filled {type(cache).__name__}; a memorizing model reads through a MemorizingCache "
                "(model.new_cache()), which keeps a bounded window and what left it. Pass none, or that cache."
            )
        elif cache.memory is None:
            cache.memory = memory
        elif cache.memory is not memory:
            raise ValueError("This cache reads another memory than the one passed: pass the cache, or a new one.")
        if kwargs.get("use_cache") is False:
            logger.info("use_cache=False: a memorizing model always reads through its window cache.")
        kwargs["use_cache"] = True
        output = super().generate(inputs, *args, **cache_kwargs(cache), **kwargs)
        if update_memory:
            self._commit(cache, memory)
        return output

    @torch.no_grad()
    def memorize(
        self,
        documents: str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]],
        tokenizer: Any = None,
        window: int | None = None,
        memory: Any = None,
        progress: bool = True,
    ) -> dict[int, list[int]]:
        """Read documents into memory, one per row (row i of later calls reads document i; a single document is
        read by every prompt). A memory that already holds as many rows continues their documents.

        `documents`: a text or list of texts (with `tokenizer`), or token ids (`[rows, tokens]` tensor or lists).
        Each document is streamed through the local window; everything but its sink tokens ends up in `memory`
        (default `model.memory`). Returns the entries per row of each memory layer.
        """
        memory = self.memory if memory is None else memory
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
        if memory.num_rows not in (0, len(rows)):
            raise ValueError(
                f"The memory holds {memory.num_rows} rows (documents); memorize() got {len(rows)} documents. Reset "
                "it (model.reset_memory()) or read them into another memory (memory=model.new_memory())."
            )
        length = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for index, row in enumerate(rows):  # right padding: every row starts with its own sink tokens
            input_ids[index, : len(row)] = torch.tensor(row)
            attention_mask[index, : len(row)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        cache = self.new_cache(window, memory)
        for start in tqdm(range(0, length, cache.window), desc="memorize", unit="chunk", disable=not progress):
            end = min(start + cache.window, length)
            chunk = input_ids[:, start:end]
            self(chunk, attention_mask=attention_mask[:, :end], cache=cache, logits_to_keep=1)
        self._commit(cache, memory)
        return memory.entries()

    def _commit(self, cache: MemorizingCache, memory: Any) -> None:
        """Move what `cache` read into `memory`: its window (but the sinks) joins what already left it, the first
        sequence of each prompt is appended to the prompt's memory row, and the overflow is emptied, so that a call
        continuing the cache reads (and commits) each token once, from memory."""
        if cache.sink_columns is None:
            return
        cache.evict(cache.num_columns - cache.sink_columns, self._rotary())
        rows = torch.arange(0, cache.overflow.num_rows, cache.per_prompt)
        memory.extend(cache.overflow, rows)
        cache.overflow.reset()
