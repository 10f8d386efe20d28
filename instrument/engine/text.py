"""Prompts to text embeddings, cached, with the token positions of every word.

The bend engine targets prompt tokens by word ("the red in 'a red fox'"), so each encoded prompt keeps,
for every word, the positions of the tokens that spell it. Encoding follows the Wan pipeline: pad to the
text length, run the encoder with the attention mask, then zero every position past the prompt.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger("instrument.text")
_WORD = re.compile(r"\w+(?:['’-]\w+)*", re.UNICODE)


@dataclass(frozen=True)
class EncodedPrompt:
    text: str
    embeddings: torch.Tensor  # [1, text_len, text_dim]
    length: int  # tokens actually used (the rest are zeros)
    words: tuple[tuple[str, tuple[int, ...]], ...]  # (word, token positions) in prompt order
    truncated: bool

    def positions(self, word: str) -> list[int]:
        """Token positions of every occurrence of `word` (case-insensitive); [] if absent."""
        w = word.lower()
        return [p for text, pos in self.words if text.lower() == w for p in pos]


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder, text_len: int, device, dtype, cache_size: int = 32):
        self.tokenizer = tokenizer
        self.encoder = text_encoder
        self.text_len = text_len
        self.device = device
        self.dtype = dtype
        self._cache: OrderedDict[str, EncodedPrompt] = OrderedDict()
        self.cache_size = cache_size

    def encode(self, text: str) -> EncodedPrompt:
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        encoded = self._encode(text)
        self._cache[text] = encoded
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return encoded

    @torch.no_grad()
    def _encode(self, text: str) -> EncodedPrompt:
        tok = self.tokenizer
        full = tok(text, add_special_tokens=True, truncation=False)["input_ids"]
        truncated = len(full) > self.text_len
        if truncated:
            log.warning("prompt is %d tokens, truncated to the text length %d: %r",
                        len(full), self.text_len, text[:60])
        batch = tok(text, padding="max_length", max_length=self.text_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        length = int(mask.sum())
        hidden = self.encoder(ids, attention_mask=mask).last_hidden_state.to(self.dtype)
        hidden[:, length:] = 0
        return EncodedPrompt(text, hidden, length, self._word_positions(text, length), truncated)

    def _word_positions(self, text: str, length: int):
        words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
        try:
            offsets = self.tokenizer(text, add_special_tokens=True, truncation=True,
                                     max_length=self.text_len, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, TypeError, KeyError):
            return self._word_positions_slow(words, length)
        result = []
        for word, start, end in words:
            pos = tuple(i for i, (s, e) in enumerate(offsets[:length]) if e > s and s < end and e > start)
            if pos:
                result.append((word, pos))
        return tuple(result)

    def _word_positions_slow(self, words, length):
        # Tokenizers without offsets: count each word's tokens in turn (exact for word-level vocabularies,
        # close for subword ones, whose first piece may differ at the start of a text).
        result, cursor = [], 0
        for word, _, _ in words:
            n = len(self.tokenizer(word, add_special_tokens=False)["input_ids"])
            pos = tuple(p for p in range(cursor, cursor + n) if p < length)
            if pos:
                result.append((word, pos))
            cursor += n
        return tuple(result)
