"""Text of a growing list of generated ids, released piece by piece for streaming.

Two things may not be sent early: half of a multi-byte character (byte-level tokens split
them) and text that could still turn out to be the start of a stop string (a client must
never see the stop string, nor a prefix of it that is then taken back). So each push
releases the decoded text up to the longest tail that is a proper prefix of some stop
string; when a stop string appears the text ends before it, as `lmlab generate` cuts it.
"""

from __future__ import annotations

from lmlab.infer.generate import TextStreamer


class TextStream:
    def __init__(self, tok, stops: list[str] | None = None) -> None:
        self.tok, self.stops = tok, list(stops or [])
        self.ids: list[int] = []
        self.pieces = TextStreamer(tok)  # the incremental decoding
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # the text so far, cut before a stop string
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a generated id; the text that may be sent now."""
        self.ids.append(token)
        if self.stopped:
            return ""
        piece = self.pieces.push(token)
        if not piece:  # nothing new yet (half a character)
            return ""
        # the text before had no stop string: a new one ends in the new piece
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        self.text = self._cut(self.text, start)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """Whatever was held back, once the sequence has ended (from the whole decode, so
        the final text is exactly what `lmlab generate` gives)."""
        if not self.stopped:
            self.text = self._cut(self.tok.decode(self.ids, skip_special_tokens=True))
        return self._release(final=True)

    def _cut(self, text: str, start: int = 0) -> str:
        ends = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if ends:
            self.stopped = True
            return text[: min(ends)]
        return text

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held(self.text)
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
