"""Talking to a model: loading it for generation, streaming a reply as text, and the chat
loop behind `lmlab chat`. Kept out of the command line so a server can reuse them.

A conversation is a list of turns (`{"role", "content"}`) that the model's own chat template
renders for each reply (`lmlab.tokenizer.chat`: lmlab's for lmlab's models, the one a
Hugging Face directory or GGUF file carries for theirs); a reply cut short by Ctrl-C still
joins it, so the next turn sees what the model had said.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, TextIO

from lmlab import load_model, load_tokenizer
from lmlab.errors import UsageError
from lmlab.infer.generate import Contrast, TextStreamer, stream
from lmlab.infer.options import GenerationConfig
from lmlab.model.loading import resolve_checkpoint
from lmlab.tokenizer.chat import encode_chat, stop_ids_of


def load_for_generation(path: str, cfg: GenerationConfig, stop_at_end_of_turn: bool = False):
    """(model, tokenizer, config, model path) for a run or checkpoint directory, a Hugging
    Face directory or a GGUF file.

    The settings are validated before the slow load, so a bad one fails at once; the
    config returned also stops at the model's own EOS and, for chat, at its end of a turn."""
    cfg.validate()
    ckpt = resolve_checkpoint(path)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    stops = stop_ids_of(tok, chat=stop_at_end_of_turn)
    return model, tok, replace(cfg, stop_ids=[*cfg.stop_ids, *stops]), ckpt


def stream_reply(
    model,
    tok,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    stdout: TextIO,
    out: list[int] | None = None,
    contrast: Contrast | None = None,
) -> list[int]:
    """Generate, writing the text to `stdout` as it comes, then a newline; returns the
    generated ids (also appended to `out` as they come, so a caller interrupted by Ctrl-C
    keeps the part already said)."""
    streamer = TextStreamer(tok)
    ids = out if out is not None else []
    for t in stream(model, prompt_ids, cfg, tokenizer=tok, contrast=contrast):
        ids.append(t)
        stdout.write(streamer.push(t))
        stdout.flush()
    stdout.write("\n")
    return ids


@dataclass
class Chat:
    """A conversation with a model through its own chat template."""

    model: object
    tok: object
    cfg: GenerationConfig
    history: list[dict[str, str]] = field(default_factory=list)

    def reply(self, text: str, stdout: TextIO) -> str:
        """Add the user's turn and stream the model's answer to `stdout`. The answer joins
        the history even when Ctrl-C cuts it short (the KeyboardInterrupt goes on up)."""
        self.history.append({"role": "user", "content": text})
        said: list[int] = []
        try:
            ids = encode_chat(self.tok, self.history)
            stream_reply(self.model, self.tok, ids, self.cfg, stdout, out=said)
        finally:
            self.history.append({"role": "assistant", "content": self.tok.decode(said)})
        return self.history[-1]["content"]


class Conversation(Protocol):
    """What the chat loop talks to: a local `Chat`, or a model behind a server
    (`lmlab.prompt.remote.RemoteChat`)."""

    history: list[dict[str, str]]

    def reply(self, text: str, stdout: TextIO) -> str: ...


def chat_loop(chat: Conversation, stdin: TextIO, stdout: TextIO) -> Conversation:
    """Read a line, answer it, until /exit, /quit or the end of input; /reset forgets the
    conversation, /history prints it. Ctrl-C during a reply stops that reply only; Ctrl-C
    at the prompt ends the loop (the user is leaving, not failing). Returns the chat."""
    interactive = stdin.isatty()
    while True:
        try:
            if interactive:
                stdout.write("you> ")
                stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            break
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.history = []
            continue
        if line == "/history":
            for turn in chat.history:
                stdout.write(f"[{turn['role']}] {turn['content']}\n")
            continue
        if not line:
            continue
        stdout.write("model> ")
        stdout.flush()
        try:
            chat.reply(line, stdout)
        except KeyboardInterrupt:  # stop this reply only; what it said stays in the history
            stdout.write(" [stopped]\n")
        except UsageError as e:  # a server refused the turn: say why, keep talking
            stdout.write(f"[error] {e}\n")
    return chat
