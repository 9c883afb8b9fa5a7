"""`lmlab generate`, `chat` and `bench infer`: using a model."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig, WatermarkConfig

THREADS_HELP = "torch threads: a number, or auto (the fastest measured here, now)."


def generation_options(*names: str):
    """Give a command one option per named `GenerationConfig` field (every CLI field when
    none are named), with the field's default and help text, in place of its `gen`
    parameter; the command receives the `GenerationConfig` they make. The options are
    defined once, on the dataclass, so the command line cannot drift from it."""
    fields = [
        f
        for f in dataclasses.fields(GenerationConfig)
        if f.metadata.get("cli", True) and (not names or f.name in names)
    ]
    hints = typing.get_type_hints(GenerationConfig)
    options = [_option(f, hints[f.name]) for f in fields]

    def decorate(command):
        sig = inspect.signature(command, eval_str=True)
        params = list(sig.parameters.values())
        at = [p.name for p in params].index("gen")
        kind = params[at].kind  # keyword-only after options with defaults (`*, gen`)
        params[at : at + 1] = [p.replace(kind=kind) for p in options]

        @functools.wraps(command)
        def run(*args, **kwargs):
            values = {}
            for f in fields:
                v = kwargs.pop(f.name)
                if "parse" in f.metadata:
                    v = f.metadata["parse"](v)
                elif v is None and f.default is dataclasses.MISSING:
                    v = f.default_factory()  # a repeatable option given no times
                values[f.name] = list(v) if isinstance(v, tuple | list) else v
            return command(*args, gen=GenerationConfig(**values), **kwargs)

        run.__signature__ = sig.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _option(f: dataclasses.Field, hint) -> inspect.Parameter:
    """One `GenerationConfig` field as a typer option: its flags, type, default and help."""
    default = None if f.default is dataclasses.MISSING else f.default
    if "parse" in f.metadata:  # given as text (`--early-stopping never`), parsed on use
        hint, default = str, str(default).lower()
    elif f.default is dataclasses.MISSING:  # a list: a repeatable option
        hint = hint | None
    option = typer.Option(*f.metadata.get("flags", ()), help=f.metadata["help"])
    return inspect.Parameter(
        f.name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[hint, option],
        default=default,
    )


@app.command()
@generation_options()
def generate(
    model: Annotated[
        str, typer.Argument(help="A run or checkpoint directory, an HF directory, a GGUF file.")
    ],
    prompt: Annotated[
        list[str], typer.Option(help="Text to continue (repeat for a batch of prompts).")
    ],
    gen: GenerationConfig,
    draft: Annotated[
        str | None, typer.Option(help="Speculative decoding with this draft model.")
    ] = None,
    gamma: Annotated[int, typer.Option(help="Draft tokens per speculative round.")] = 4,
    amateur: Annotated[
        str | None, typer.Option(help="Contrastive decoding against this amateur model.")
    ] = None,
    cd_alpha: Annotated[float, typer.Option(help="Contrastive plausibility threshold.")] = 0.1,
    amateur_temperature: Annotated[float, typer.Option(help="Amateur's temperature.")] = 1.0,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the model's own chat template.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per output.")] = False,
    watermark: Annotated[
        bool, typer.Option(help="KGW watermark (lmlab detect-watermark finds it).")
    ] = False,
    watermark_gamma: Annotated[
        float | None, typer.Option(help="Watermark: green list fraction (0.25).")
    ] = None,
    watermark_delta: Annotated[
        float | None, typer.Option(help="Watermark: added to green logits (2.0).")
    ] = None,
    watermark_key: Annotated[
        int | None, typer.Option(help="Watermark: the hashing key (15485863).")
    ] = None,
    watermark_scheme: Annotated[
        str | None, typer.Option(help="Watermark: lefthash or selfhash.")
    ] = None,
    threads: Annotated[str | None, typer.Option(help=THREADS_HELP)] = None,
) -> None:
    """Continue prompts with any decoding strategy; one plain prompt streams its text."""
    from lmlab import load_model
    from lmlab.infer.engine import finish_text
    from lmlab.infer.generate import Contrast, generate_batch
    from lmlab.infer.session import load_for_generation, stream_reply
    from lmlab.infer.speculative import speculative_generate
    from lmlab.tokenizer.chat import encode_chat

    if draft and amateur:
        raise UsageError("--draft and --amateur: choose speculative or contrastive decoding")
    wm = watermark_config(
        watermark, watermark_gamma, watermark_delta, watermark_key, watermark_scheme
    )
    if wm is not None:
        if draft:  # the acceptance test compares the target's and the draft's own distributions
            raise UsageError("--watermark: speculative decoding (--draft) cannot apply it")
        gen = dataclasses.replace(gen, watermark=wm)
    m, tok, cfg, _ = load_for_generation(model, gen, stop_at_end_of_turn=chat)
    from lmlab.infer.bench import apply_threads

    apply_threads(threads, m, log)
    ids = [
        encode_chat(tok, [{"role": "user", "content": p}]) if chat else tok.encode(p).ids
        for p in prompt
    ]
    contrast = Contrast(load_model(amateur), cd_alpha, amateur_temperature) if amateur else None
    simple = len(prompt) == 1 and cfg.n == 1 and cfg.num_beams == 1 and cfg.logprobs is None
    if simple and not json_out and not draft:
        sys.stdout.write(prompt[0] if not chat else "")
        stream_reply(m, tok, ids[0], cfg, sys.stdout, contrast=contrast)
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
            comps = [c for c in comps if c.finish_reason is not None]
            finish_text(comps, tok, cfg)
            _print_completions(comps, prompt, tok, chat, json_out)
            raise
    _print_completions(comps, prompt, tok, chat, json_out)
    if stats is not None:
        log("speculative: " + ", ".join(f"{k} {v}" for k, v in stats.as_dict().items()))


def watermark_config(
    on: bool,
    gamma: float | None,
    delta: float | None,
    key: int | None,
    scheme: str | None,
) -> WatermarkConfig | None:
    """The `WatermarkConfig` the flags ask for (None without `on`), validated; a setting
    given without `on` is refused rather than ignored."""
    given = {"gamma": gamma, "delta": delta, "hashing_key": key, "seeding_scheme": scheme}
    given = {k: v for k, v in given.items() if v is not None}
    if not on:
        if given:
            raise UsageError(f"--watermark-{next(iter(given)).split('_')[-1]} needs --watermark")
        return None
    return WatermarkConfig(**given).validate()


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
@generation_options("temperature", "top_p", "top_k", "max_new_tokens", "seed", "compile")
def chat(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A run or checkpoint directory, an HF directory, a GGUF file; with --url, "
            "the served model's name (default: the first it lists)."
        ),
    ] = None,
    *,
    url: Annotated[
        str | None,
        typer.Option(help="Talk to an OpenAI-compatible server instead (lmlab serve, vLLM…)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="The server's key (default: env LMLAB_API_KEY).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt (with --url).")] = None,
    threads: Annotated[str, typer.Option(help=THREADS_HELP)] = "auto",
    gen: GenerationConfig,
) -> None:
    """Talk to a model in its own chat template (/reset, /history, /exit; Ctrl-C stops a reply)."""
    from lmlab.infer.session import Chat, chat_loop, load_for_generation

    if url is not None:
        from lmlab.prompt.remote import RemoteChat

        remote = RemoteChat.open(url, model, gen, api_key=api_key, system=system)
        log(f"chatting with {remote.model} at {url}; /reset, /history, /exit")
        chat_loop(remote, sys.stdin, sys.stdout)
        return
    if model is None:
        raise UsageError("chat: give a MODEL, or --url of a server")
    if system is not None:
        raise UsageError("chat: --system is for --url; a local model's template has its own")
    m, tok, cfg, ckpt = load_for_generation(model, gen, stop_at_end_of_turn=True)
    from lmlab.infer.bench import apply_threads

    apply_threads(threads, m, log)
    log(
        f"chatting with {ckpt} (context {m.cfg.max_seq_len} tokens); /reset, /history, /exit; "
        "Ctrl-C stops a reply, Ctrl-C at the prompt quits"
    )
    chat_loop(Chat(m, tok, cfg), sys.stdin, sys.stdout)


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
    threads: Annotated[str | None, typer.Option(help=THREADS_HELP)] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    profile: Annotated[
        bool, typer.Option(help="Also show where a decode step's time goes (torch profiler).")
    ] = False,
    compile: Annotated[
        bool, typer.Option(help="Decode through the torch.compile'd step (static KV cache).")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Prefill and decode tokens/s, per-token latency at batch 1 and N, and peak memory."""
    import torch

    from lmlab import load_model
    from lmlab.infer.bench import (
        apply_threads,
        bench_infer,
        format_bench,
        format_profile,
        profile_decode,
    )
    from lmlab.utils import claim_output_file, json_with, write_json

    if json_out is not None:  # its own earlier report is replaced; any other file is kept
        claim_output_file(json_out, "bench report", json_with("threads", "results"), True, "--json")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device here")
    model = load_model(ckpt, device=device)
    apply_threads(threads, model, log)
    report = bench_infer(model, batch or [1, 8], prompt_len, new_tokens, repeats, compile)
    print(format_bench(report))
    if profile:
        steps = max(2, min(new_tokens, 32))
        plen = max(1, min(prompt_len, model.cfg.max_seq_len - steps - 4))
        report["profiles"] = [profile_decode(model, b, plen, steps) for b in batch or [1, 8]]
        for p in report["profiles"]:
            print("\n" + format_profile(p))
    if json_out is not None:
        write_json(json_out, report)
