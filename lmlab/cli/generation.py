"""`lmlab generate`, `chat` and `bench infer`: using a model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import (
    app,
)
from lmlab.console import log
from lmlab.errors import UsageError

Temperature = Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest (0 = off).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Generation length limit.")]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling.")]


def _early_stopping(text: str) -> bool | str:
    table = {"true": True, "false": False, "never": "never"}
    if text.lower() not in table:
        raise UsageError(f"--early-stopping {text}: use true, false or never")
    return table[text.lower()]


def _load_for_generation(path: str, stop_at_end_of_turn: bool, **options):
    """Model, tokenizer and validated decoding settings for `generate` and `chat`."""
    from lmlab import load_model, load_tokenizer
    from lmlab.infer.sampling import GenerationConfig
    from lmlab.model.checkpoint import resolve_checkpoint
    from lmlab.tokenizer import END, EOS, special_id

    cfg = GenerationConfig(**options).validate()  # bad settings fail before loading
    ckpt = resolve_checkpoint(path)
    m, tok = load_model(ckpt), load_tokenizer(ckpt)
    cfg.stop_ids = [special_id(tok, EOS)]
    if stop_at_end_of_turn:
        cfg.stop_ids.append(special_id(tok, END))
    return m, tok, cfg, ckpt


def _stream_reply(
    model, tok, prompt_ids: list[int], cfg, out: list[int] | None = None, **kw
) -> list[int]:
    """Generate, writing text to stdout as it comes; returns the generated ids (also
    appended to `out` as they come, so an interrupted caller keeps the part said)."""
    from lmlab.infer.generate import TextStreamer, stream

    streamer = TextStreamer(tok)
    ids = out if out is not None else []
    for t in stream(model, prompt_ids, cfg, tokenizer=tok, **kw):
        ids.append(t)
        sys.stdout.write(streamer.push(t))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return ids


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run directory or a checkpoint directory.")],
    prompt: Annotated[
        list[str], typer.Option(help="Text to continue (repeat for a batch of prompts).")
    ],
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min-p x the top one.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="CTRL penalty (1 = off).")] = 1.0,
    presence_penalty: Annotated[float, typer.Option(help="Minus this once seen.")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(help="Minus this per use.")] = 0.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="Never repeat an n-gram.")] = 0,
    max_new_tokens: MaxNew = 100,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per prompt.")] = 1,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1 = off).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam score / length^this.")] = 1.0,
    early_stopping: Annotated[str, typer.Option(help="Beams: true, false or never.")] = "false",
    num_return_sequences: Annotated[int, typer.Option(help="Beams: the n best.")] = 1,
    logprobs: Annotated[
        int | None, typer.Option(help="Report log-probs of the chosen and top-k tokens.")
    ] = None,
    seed: Seed = None,
    draft: Annotated[
        str | None, typer.Option(help="Speculative decoding with this draft model.")
    ] = None,
    gamma: Annotated[int, typer.Option(help="Draft tokens per speculative round.")] = 4,
    amateur: Annotated[
        str | None, typer.Option(help="Contrastive decoding against this amateur model.")
    ] = None,
    cd_alpha: Annotated[float, typer.Option(help="Contrastive plausibility threshold.")] = 0.1,
    amateur_temperature: Annotated[float, typer.Option(help="Amateur's temperature.")] = 1.0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per output.")] = False,
) -> None:
    """Continue prompts with any decoding strategy; one plain prompt streams its text."""
    from lmlab import load_model
    from lmlab.infer.generate import Contrast, finish_text, generate_batch
    from lmlab.infer.speculative import speculative_generate
    from lmlab.tokenizer import format_chat

    if draft and amateur:
        raise UsageError("--draft and --amateur: choose speculative or contrastive decoding")
    m, tok, cfg, _ = _load_for_generation(
        model,
        stop_at_end_of_turn=chat,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        max_new_tokens=max_new_tokens,
        stop_strings=stop or [],
        n=n,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=_early_stopping(early_stopping),
        num_return_sequences=num_return_sequences,
        logprobs=logprobs,
        seed=seed,
    )
    texts = [format_chat([{"role": "user", "content": p}]) if chat else p for p in prompt]
    ids = [tok.encode(t).ids for t in texts]
    contrast = Contrast(load_model(amateur), cd_alpha, amateur_temperature) if amateur else None
    simple = len(prompt) == 1 and n == 1 and num_beams == 1 and logprobs is None
    if simple and not json_out and not draft:
        sys.stdout.write(prompt[0] if not chat else "")
        _stream_reply(m, tok, ids[0], cfg, contrast=contrast)
        return
    stats = None
    if draft:
        if len(prompt) != 1:
            raise UsageError("--draft: speculative decoding takes one --prompt")
        comp, stats = speculative_generate(m, load_model(draft), ids[0], cfg, gamma, tok)
        comps = [comp]
    else:
        comps = []
        try:
            generate_batch(m, ids, cfg, tokenizer=tok, contrast=contrast, out=comps)
        except KeyboardInterrupt:  # print what finished, then report the interrupt
            comps = [c for c in comps if c.finish_reason == "stop"]
            finish_text(comps, tok, cfg)
            _print_completions(comps, prompt, tok, chat, json_out)
            raise
    _print_completions(comps, prompt, tok, chat, json_out)
    if stats is not None:
        log("speculative: " + ", ".join(f"{k} {v}" for k, v in stats.as_dict().items()))


def _print_completions(comps, prompt: list[str], tok, chat: bool, json_out: bool) -> None:
    import json

    for c in comps:
        if json_out:
            row = {
                "prompt": prompt[c.prompt_index],
                "text": c.text,
                "tokens": c.tokens,
                "finish_reason": c.finish_reason,
            }
            if c.score is not None:
                row["score"] = c.score
            if c.logprobs is not None:
                row["logprobs"] = c.logprobs
                row["top_logprobs"] = [
                    [{"token": tok.decode([i]), "id": i, "logprob": v} for i, v in top]
                    for top in c.top_logprobs
                ]
            print(json.dumps(row, ensure_ascii=False))
        else:
            head = f"[{c.prompt_index}]" + (f" score {c.score:.4f}" if c.score is not None else "")
            print(f"{head} {prompt[c.prompt_index] if not chat else ''}{c.text}")
            if c.logprobs is not None:
                print(f"  logprob sum {sum(c.logprobs):.4f}")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A run directory or a checkpoint directory.")],
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    max_new_tokens: MaxNew = 100,
    seed: Seed = None,
) -> None:
    """Talk to a model through its chat template (/reset, /history, /exit; Ctrl-C stops a reply)."""
    from lmlab.tokenizer import format_chat

    m, tok, cfg, ckpt = _load_for_generation(
        model,
        stop_at_end_of_turn=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    log(
        f"chatting with {ckpt} (context {m.cfg.max_seq_len} tokens); /reset, /history, /exit; "
        "Ctrl-C stops a reply, Ctrl-C at the prompt quits"
    )
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            if interactive:
                sys.stdout.write("you> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # at the prompt: the user is leaving
            sys.stdout.write("\n")
            break
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            continue
        if line == "/history":
            for turn in history:
                print(f"[{turn['role']}] {turn['content']}")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        sys.stdout.flush()
        reply: list[int] = []
        try:
            _stream_reply(m, tok, tok.encode(format_chat(history)).ids, cfg, out=reply)
        except KeyboardInterrupt:  # stop this reply only; what it said stays in the history
            sys.stdout.write(" [stopped]\n")
        history.append({"role": "assistant", "content": tok.decode(reply)})


bench_app = typer.Typer(help="Measure speed on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("infer")
def bench_infer_cmd(
    ckpt: Annotated[str, typer.Argument(help="A checkpoint or run directory.")],
    batch: Annotated[
        list[int] | None, typer.Option(help="Batch size (repeatable; default 1 and 8).")
    ] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per row.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per row.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (best kept).")] = 3,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Prefill and decode tokens/s, per-token latency at batch 1 and N, and peak memory."""
    import torch

    from lmlab import load_model
    from lmlab.infer.bench import bench_infer, format_bench
    from lmlab.utils import claim_output_file, json_with, write_json

    if json_out is not None:  # its own earlier report is replaced; any other file is kept
        claim_output_file(json_out, "bench report", json_with("threads", "results"), True, "--json")
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device here")
    model = load_model(ckpt, device=device)
    report = bench_infer(model, batch or [1, 8], prompt_len, new_tokens, repeats)
    print(format_bench(report))
    if json_out is not None:
        write_json(json_out, report)
