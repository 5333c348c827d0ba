"""Streaming text: incremental detokenization and stop-string hold-back."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Byte-level BPE splits a multi-byte UTF-8 character over several tokens, and
    decoding a single token of such a character gives U+FFFD. So the text is
    always decoded over a window of ids that starts at a clean boundary, and a
    delta is only released when the window's text has grown and does not end in
    a half character. Decoding a short window rather than every generated id
    keeps the per-token cost constant however long the completion grows.
    """

    __slots__ = ("_decode", "_ids", "_prefix_offset", "_prefix_text", "_read_offset")

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (a clean character boundary)
        self._read_offset = 0  # ids before this have been released as text
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held back (a dangling partial character included)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text):
            return ""
        if not final and text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return delta


class StopFilter:
    """Holds back text that could be the start of a stop string.

    Text is released only once it can no longer be part of a stop string, so
    a stop string (and whatever follows it) never reaches the client even when
    it arrives split across several tokens.
    """

    __slots__ = ("_held", "_max_len", "_stops", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.matched = False

    def push(self, text: str) -> str:
        """The text that is safe to emit now; sets `matched` when a stop string appeared."""
        if self.matched:
            return ""
        if not self._stops:
            return text
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            self._held = ""
            return held[:cut]
        keep = self._partial_suffix(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def finish(self) -> str:
        """At the end of generation nothing can complete a stop string any more."""
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
