"""Incremental detokenization and stop-string matching for one sequence.

Text comes from ``tokenizers``' own ``DecodeStream``, which handles byte-level pieces that only
become valid UTF-8 a token or two later. While streaming, the last ``max_stop_len - 1``
characters are held back, so a client never sees the start of a stop string that is then cut.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._num_emitted = 0  # characters of ``text`` already handed out

    def push(self, token_id: int) -> str | None:
        """Add one token; return the stop string the text now contains (the text is cut just
        before it), or None."""
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        for s in self._stop:
            at = self.text.find(s, start)
            if at != -1:
                self.text = self.text[:at]
                return s
        return None

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, minus what could still become a stop string."""
        end = len(self.text) if finished else max(self._num_emitted, len(self.text) - self._hold)
        delta = self.text[self._num_emitted : end]
        self._num_emitted = end
        return delta
