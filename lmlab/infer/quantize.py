"""`lmlab quantize`: post-training weight quantization of a checkpoint, with a report.

The quantized-layer format itself (INT8, packed INT4 and LLM.int8() linears, what is
quantized, how it is saved and loaded back) is `lmlab.model.quant`. This is the command:
`quantize_checkpoint` writes a quantized checkpoint that `lmlab.load_model` reads back,
plus a report comparing the model before and after (weights file size, memory, forward
and decode speed, perplexity), and `format_report` prints it. docs/quantization.md has the
format and the measurements.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointError, UsageError
from lmlab.model.checkpoint import FORMAT, read_config
from lmlab.model.loading import as_checkpoint, load_model, resolve_checkpoint
from lmlab.model.quant import (
    check_options,
    int8_backend_name,
    outlier_share,
    quantizable,
    quantize_model,
    save_quantized,
    w8a8_activation_qmax,
    w8a8_kernel_works,
    weight_error,
)
from lmlab.utils import claim_output_dir

# --- measuring ---------------------------------------------------------------------------


def memory_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, a tensor shared by two modules counted once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.no_grad()
def compare_speed(models: dict[str, nn.Module], probe: dict, repeats: int = 3) -> dict:
    """Forward and greedy-decode tokens/s of each model, best of `repeats` rounds that
    alternate between the models, so a busy machine slows them alike.

    Forward: full passes over `probe["batch"]` [B, T]; decode: `generate` from
    `probe["prompt"]` for `probe["new_tokens"]` tokens with the KV cache."""
    from lmlab.infer.generate import generate
    from lmlab.infer.options import GenerationConfig

    ids, prompt = probe["batch"], probe["prompt"]
    gen = GenerationConfig(max_new_tokens=probe["new_tokens"])
    best = {name: {"forward": math.inf, "decode": math.inf} for name in models}
    counts = {}
    for m in models.values():  # warm-up
        _logits(m, ids[:, :8])
        generate(m, prompt, GenerationConfig(max_new_tokens=2))
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            _logits(m, ids)
            t1 = time.perf_counter()
            counts[name] = len(generate(m, prompt, gen))
            t2 = time.perf_counter()
            best[name]["forward"] = min(best[name]["forward"], t1 - t0)
            best[name]["decode"] = min(best[name]["decode"], t2 - t1)
    return {
        name: {
            "forward_tokens_per_s": ids.numel() / b["forward"],
            "decode_tokens_per_s": counts[name] / b["decode"],
        }
        for name, b in best.items()
    }


def find_eval_tokens(ckpt: Path, eval_data: str | Path | None) -> tuple[Path | None, str]:
    """The token-shard directory whose `val` split scores the model, or (None, why not).

    A checkpoint inside a run (runs/NAME/pretrain/model, runs/NAME/sft/model, or a compare
    variant) uses the run's held-out shards, as the eval stage does. A text file is
    returned as it is (the model's own tokenizer tokenizes it)."""
    if eval_data is not None:
        p = Path(eval_data)
        if p.is_file():
            return p, ""
        for cand in (p, p / "tokenizer" / "tokens"):
            if _is_token_shards(cand):
                return cand, ""
        raise UsageError(
            f"{p}: eval data must be a token-shard directory (with manifest.json), a run "
            "directory or a text file"
        )
    for parent in list(ckpt.resolve().parents)[:3]:
        cand = parent / "tokenizer" / "tokens"
        if _is_token_shards(cand):
            return cand, ""
    return None, (
        f"no held-out tokens: {ckpt} is not inside a run directory (runs/NAME/...); "
        "pass eval_data (a token-shard directory, or a text file for a model of its own)"
    )


def _is_token_shards(path: Path) -> bool:
    """A token-shard directory (`lmlab.data.shards`), not a run's own manifest.json."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(
        "lmlab-token-shards"
    )


def _eval_setup(
    ckpt: Path,
    cfg,
    raw: dict,
    eval_data: str | Path | None,
    eval_tokens: int,
    seq_len: int | None = None,
) -> tuple[dict | None, str]:
    """What the shared scorer (`stream_scores`) needs: tokens, tokenizer, window length; or
    (None, why not). The window is `seq_len`, else the one the model was trained with,
    else its context length."""
    from tokenizers import Tokenizer

    from lmlab.data.shards import open_split
    from lmlab.utils import read_json

    if cfg.family == "encoder_decoder":
        return None, "perplexity is measured for decoder models, not encoder-decoders"
    shards, why = find_eval_tokens(ckpt, eval_data)
    if shards is None:
        return None, why
    if seq_len is None:
        seq_len = (raw.get("training") or {}).get("config", {}).get("seq_len") or cfg.max_seq_len
    seq_len = min(int(seq_len), cfg.max_seq_len)
    if shards.is_file():
        return _text_setup(ckpt, shards, eval_tokens, seq_len), ""
    vocab = read_json(shards / "manifest.json").get("vocab_size")
    if vocab != cfg.vocab_size:
        msg = f"{shards}: tokenized with a {vocab}-token vocabulary, the model has {cfg.vocab_size}"
        if eval_data is not None:
            raise UsageError(msg)
        return None, msg
    tok_file = next(
        (p for p in (ckpt / "tokenizer.json", shards.parent / "tokenizer.json") if p.is_file()),
        None,
    )
    if tok_file is None:
        return None, f"no tokenizer.json beside {ckpt} or {shards} (needed for bits per byte)"
    try:
        val = open_split(shards, "val")
    except UsageError as e:
        if eval_data is not None:
            raise
        return None, str(e)
    if min(len(val) - 1, eval_tokens) < seq_len:
        return (
            None,
            f"{shards}: {len(val)} validation tokens, fewer than one {seq_len}-token window",
        )
    setup = {"tokens": val, "tokenizer": Tokenizer.from_file(str(tok_file)), "seq_len": seq_len}
    return {**setup, "data": str(shards), "max_tokens": eval_tokens}, ""


def _text_setup(ckpt: Path, text_file: Path, eval_tokens: int, seq_len: int) -> dict:
    """A text file as held-out tokens, tokenized by the checkpoint's own tokenizer: how a
    model that was not trained here (an imported one) gets its perplexity checked."""
    import numpy as np
    from tokenizers import Tokenizer

    tok_file = ckpt / "tokenizer.json"
    if not tok_file.is_file():
        raise UsageError(f"--eval-data {text_file}: a text file needs {tok_file} to tokenize it")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--eval-data {text_file}: not UTF-8 text") from None
    tok = Tokenizer.from_file(str(tok_file))
    ids = np.asarray(tok.encode(text).ids, dtype=np.int64)
    if min(len(ids) - 1, eval_tokens) < seq_len:
        raise UsageError(
            f"--eval-data {text_file}: {len(ids)} tokens, fewer than one {seq_len}-token "
            "window (give more text, or a shorter --eval-seq-len)"
        )
    setup = {"tokens": ids, "tokenizer": tok, "seq_len": seq_len}
    return {**setup, "data": str(text_file), "max_tokens": eval_tokens}


def _perplexity(model: nn.Module, setup: dict, label: str) -> dict:
    """Loss, perplexity and bits per byte over the held-out windows `setup` holds, framed
    as the eval stage frames them (`stream_scores`)."""
    from lmlab.model.scoring import stream_scores, token_byte_lengths

    tok = setup["tokenizer"]
    lengths = token_byte_lengths(tok, tok.get_vocab_size())
    return stream_scores(
        model, setup["tokens"], setup["seq_len"], setup["max_tokens"], lengths, label=label
    ).summary()


def _probe_inputs(cfg, setup: dict | None, new_tokens: int, speed: bool) -> dict:
    """A fixed batch for forward speed, a prompt for decoding and a batch for the reload
    check: from the validation tokens when there are some, else seeded random ids."""
    t = min(cfg.max_seq_len, 128)
    if setup is not None:
        ids = torch.from_numpy(setup["tokens"][: 4 * t].astype("int64"))
    else:
        ids = torch.randint(0, cfg.vocab_size, (4 * t,), generator=torch.Generator().manual_seed(0))
    if len(ids) < 4 * t:  # tiny validation split: repeat it
        ids = ids.repeat(4 * t // len(ids) + 1)
    rows = 4 if speed else 1  # a batch to time forward passes on; else one row to check
    batch = ids[: rows * t].view(rows, t)
    new_tokens = max(1, min(new_tokens, cfg.max_seq_len - 17))
    return {
        "batch": batch,
        "prompt": batch[0, :16].tolist(),
        "new_tokens": new_tokens,
        "speed": speed,
    }


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    method: str,
    group_size: int = 64,
    threshold: float = 6.0,
    include_lm_head: bool = False,
    eval_tokens: int = 50_000,
    progress: bool = True,
    eval_data: str | Path | None = None,
    decode_tokens: int = 32,
    measure_speed: bool = True,
    overwrite: bool = False,
    eval_seq_len: int | None = None,
    calibration: str | Path | None = None,
    calibration_tokens: int = 16_384,
    alpha: float = 0.5,
    outliers: int = 32,
) -> dict:
    """Quantize the checkpoint (or run's model) `src` into the checkpoint directory `out`,
    written atomically with `quantization.json`; returns that report.

    The report compares the model before and after: weights file size, parameter memory,
    forward and greedy-decode tokens/s (at the process's thread count) and validation
    perplexity on the first `eval_tokens` held-out tokens (see `find_eval_tokens`) in
    windows of `eval_seq_len`. A GGUF file (or store name) is converted first, so its own
    tokenizer files travel with the quantized checkpoint. An existing `out` is replaced
    only when it is an earlier `quantize` output and `overwrite`.

    `w8a8` calibrates on `calibration_tokens` tokens of `calibration` (a text file, token
    shards or a run; default: the run's training split), never the held-out split."""
    check_options(method, group_size, threshold, alpha, outliers)
    if not (isinstance(calibration_tokens, int) and calibration_tokens > 0):
        raise UsageError(f"calibration_tokens {calibration_tokens!r}: must be positive")
    if not (isinstance(eval_tokens, int) and eval_tokens > 0):
        raise UsageError(f"eval_tokens {eval_tokens!r}: must be a positive number of tokens")
    if eval_seq_len is not None and not (isinstance(eval_seq_len, int) and eval_seq_len > 0):
        raise UsageError(f"eval_seq_len {eval_seq_len!r}: must be a positive number of tokens")
    ckpt = resolve_checkpoint(src)
    out = Path(out)
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise UsageError(f"--out {out}: would replace the checkpoint being quantized")
    claim_output_dir(out, "quantize", overwrite=overwrite)
    with as_checkpoint(ckpt, scratch=out.resolve().parent) as ckpt_dir:
        return _quantize(
            ckpt_dir,
            ckpt,
            out,
            method,
            group_size,
            threshold,
            include_lm_head,
            eval_tokens,
            progress,
            eval_data,
            decode_tokens,
            measure_speed,
            eval_seq_len,
            {
                "data": calibration,
                "tokens": calibration_tokens,
                "alpha": alpha,
                "outliers": outliers,
            },
        )


def _quantize(
    ckpt: Path,
    source: Path,
    out: Path,
    method: str,
    group_size: int,
    threshold: float,
    include_lm_head: bool,
    eval_tokens: int,
    progress: bool,
    eval_data: str | Path | None,
    decode_tokens: int,
    measure_speed: bool,
    eval_seq_len: int | None,
    calib: dict,
) -> dict:
    from lmlab.console import is_quiet, log, set_quiet
    from lmlab.model.encdec import EncoderDecoder
    from lmlab.model.transformer import Transformer
    from lmlab.utils import write_json

    raw = read_config(ckpt)
    if raw.get("quantization"):
        raise UsageError(f"{ckpt}: already quantized ({raw['quantization'].get('method')})")
    fp = load_model(ckpt)
    if not isinstance(fp, Transformer | EncoderDecoder):
        raise UsageError(f"{ckpt}: only lmlab model families can be quantized")
    setup, why = _eval_setup(ckpt, fp.cfg, raw, eval_data, eval_tokens, eval_seq_len)
    probe = _probe_inputs(fp.cfg, setup, decode_tokens, measure_speed)
    names = quantizable(fp, include_lm_head)
    fp_bytes = sum(_weight_bytes(fp.get_submodule(n)) for n in names)
    calibration, calib_info = None, None
    if method == "w8a8":
        calibration, calib_info = _calibration(ckpt, fp.cfg, calib, eval_data)
    model = quantize_model(
        copy.deepcopy(fp),
        method,
        group_size,
        threshold,
        include_lm_head,
        calibration=calibration,
        alpha=calib["alpha"],
        outliers=calib["outliers"],
    )
    quiet_before = is_quiet()
    set_quiet(quiet_before or not progress)
    try:
        log(f"quantize: {method}, {len(names)} linear layers of {source}")
        lm = {}
        if setup is not None:
            lm["before"] = _perplexity(fp, setup, "fp32")
            lm["after"] = _perplexity(model, setup, method)
        with torch.no_grad():
            reference = _logits(model, probe["batch"])
        outliers = outlier_share(model)  # over the perplexity windows (or the probe batch)
        speed = compare_speed({"before": fp, "after": model}, probe) if measure_speed else None
        report = _report(ckpt, out, model, memory_bytes(fp), speed, lm, setup, why, probe)
        report["source"] = str(source)  # not the converted copy of a GGUF file
        report["quantized_weight_bytes"] = {
            "before": fp_bytes,
            "after": sum(model.get_submodule(n).quantized_bytes() for n in names),
        }
        if outliers is not None:
            report["outlier_column_share"] = outliers
        if calib_info is not None:
            report["calibration"] = calib_info
        report["weight_relative_error"] = weight_error(fp, model, names)
        del fp

        def finish(tmp: Path) -> None:
            report["disk_bytes"]["after"] = (tmp / "model.safetensors").stat().st_size
            # the written checkpoint must give back this very model before it replaces `out`
            with torch.no_grad():
                diff = float((_logits(load_model(tmp), probe["batch"]) - reference).abs().max())
            report["reload_max_abs_diff"] = diff
            if diff > 0:
                raise CheckpointError(
                    f"{out}: the reloaded model differs (max |Δlogit| {diff:.3g})"
                )
            write_json(tmp / "quantization.json", report)

        if raw.get("format") == FORMAT:  # keep what the source recorded (`training`, ...)
            extra = {k: v for k, v in raw.items() if k not in ("format", "model")}
        else:  # a Hugging Face directory, converted on load
            extra = {"converted_from": "huggingface"}
        extra["quantized_from"] = str(source)
        save_quantized(
            model, out, tokenizer_dir=ckpt, extra=extra, write_extra=finish, kind="quantize"
        )
        log(f"quantize: wrote {out}")
    finally:
        set_quiet(quiet_before)
    return report


def _calibration(ckpt: Path, cfg, calib: dict, eval_data) -> tuple[list[torch.Tensor], dict]:
    """Windows of calibration tokens for `w8a8`, and what they were: the given text file
    (the checkpoint's tokenizer reads it) or token shards' training split, by default the
    run's own. The held-out split is never used, so the perplexity check stays honest."""
    import numpy as np

    from lmlab.data.shards import open_split

    source = calib["data"]
    if source is not None and Path(source).is_file():
        setup = _text_setup(ckpt, Path(source), calib["tokens"], 1)
        ids, where = np.asarray(setup["tokens"]), str(source)
    else:
        shards, why = find_eval_tokens(ckpt, source)
        if shards is None or shards.is_file():
            raise UsageError(
                "w8a8 calibrates its smoothing and outlier channels on sample text: pass "
                "--calibration (a text file, token shards or a run), not the evaluation "
                f"text ({why})"
            )
        ids, where = open_split(shards, "train"), f"{shards} (train split)"
    ids = torch.from_numpy(np.asarray(ids[: calib["tokens"]], dtype=np.int64))
    if ids.numel() < 2:
        raise UsageError(f"calibration data {where}: fewer than 2 tokens")
    win = min(cfg.max_seq_len, 512)
    batches = [ids[i : i + win][None] for i in range(0, len(ids), win)]
    info = {"data": where, "tokens": int(ids.numel()), "alpha": calib["alpha"]}
    info["outliers"] = calib["outliers"]
    if eval_data is not None and source is not None and Path(source) == Path(eval_data):
        info["warning"] = "calibrated on the evaluation text: the perplexity change is optimistic"
    return batches, info


def _weight_bytes(lin: nn.Linear) -> int:
    return lin.weight.numel() * lin.weight.element_size()


def _disk_bytes(ckpt: Path) -> int:
    """Bytes of the weight files (an HF directory may shard them or use .bin)."""
    files = [p for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in files)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.cfg.family == "encoder_decoder":
        return model(ids, ids)
    return model(ids)


def _report(ckpt, out, model, fp_memory, speed, lm, setup, why, probe) -> dict:
    spec = model.quantization
    mods = [model.get_submodule(n) for n in spec["modules"]]
    report: dict[str, Any] = {
        "method": spec["method"],
        "group_size": spec["group_size"],
        "threshold": spec["threshold"],
        "include_lm_head": spec["include_lm_head"],
        "source": str(ckpt),
        "output": str(out),
        "modules": len(mods),
        "quantized_parameters": sum(m.in_features * m.out_features for m in mods),
        "parameters": model.cfg.num_params(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "disk_bytes": {"before": _disk_bytes(ckpt), "after": None},
        "memory_bytes": {"before": fp_memory, "after": memory_bytes(model)},
    }
    if spec["method"] == "w8a8":
        bits = 8 if w8a8_activation_qmax() == 255 else 7
        where = "fbgemm" if w8a8_kernel_works() else "reference"
        report["int8_backend"] = f"{where}, {bits}-bit activations"
    elif spec["method"] != "int4":
        report["int8_backend"] = int8_backend_name("cpu")
    if speed is not None:
        for key in ("forward_tokens_per_s", "decode_tokens_per_s"):
            report[key] = {"before": speed["before"][key], "after": speed["after"][key]}
        report["speed_setup"] = {
            "forward_batch": list(probe["batch"].shape),
            "prompt_tokens": len(probe["prompt"]),
            "new_tokens": probe["new_tokens"],
        }
    if setup is None:
        report["perplexity"] = {"measured": False, "reason": why}
    else:
        b, a = lm["before"], lm["after"]
        report["perplexity"] = {
            "measured": True,
            "before": b["perplexity"],
            "after": a["perplexity"],
            "relative_change": a["perplexity"] / b["perplexity"] - 1,
            "loss_before": b["loss"],
            "loss_after": a["loss"],
            "bits_per_byte_before": b["bits_per_byte"],
            "bits_per_byte_after": a["bits_per_byte"],
            "tokens": b["tokens"],
            "seq_len": setup["seq_len"],
            "data": setup["data"],
        }
    return report


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: dict) -> str:
    """A small console table: each measurement before, after, and the ratio or change."""
    method = report["method"]
    if method == "int4":
        method += f" (group {report['group_size']})"
    elif method == "llm_int8":
        method += f" (threshold {report['threshold']:g})"
    elif method == "w8a8" and "calibration" in report:
        c = report["calibration"]
        method += f" (alpha {c['alpha']:g}, {c['outliers']} float channels per layer)"
    rows: list[tuple[str, str, str, str]] = []

    def ratio(b, a) -> str:
        return f"×{a / b:.3f}" if a is not None and b else "-"

    for key, label in (
        ("disk_bytes", "weights file"),
        ("quantized_weight_bytes", "quantized matrices"),
        ("memory_bytes", "parameter memory"),
    ):
        if key in report:
            b, a = report[key]["before"], report[key]["after"]
            rows.append((label, _size(b), _size(a), ratio(b, a)))
    for key, label in (
        ("forward_tokens_per_s", "forward tokens/s"),
        ("decode_tokens_per_s", "decode tokens/s"),
    ):
        if key in report:
            b, a = report[key]["before"], report[key]["after"]
            rows.append((label, f"{b:,.0f}", f"{a:,.0f}", ratio(b, a)))
    if "weight_relative_error" in report:
        rows.append(("weight error ‖W−Ŵ‖/‖W‖", "", f"{report['weight_relative_error']:.4f}", ""))
    ppl = report["perplexity"]
    if ppl["measured"]:
        rows.append(
            (
                "perplexity",
                f"{ppl['before']:.3f}",
                f"{ppl['after']:.3f}",
                f"{100 * ppl['relative_change']:+.2f}%",
            )
        )
    head = (
        f"{method}: {report['modules']} linear layers, "
        f"{report['quantized_parameters']:,} of {report['parameters']:,} parameters quantized"
    )
    widths = [max(len(r[i]) for r in [("", "before", "after", "change"), *rows]) for i in range(4)]
    lines = [head]
    for r in [("", "before", "after", "change"), *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    if not ppl["measured"]:
        lines.append(f"perplexity not measured: {ppl['reason']}")
    if "outlier_column_share" in report:
        lines.append(
            f"outlier columns (|x| > {report['threshold']:g}): "
            f"{100 * report['outlier_column_share']:.3f}% of input features"
        )
    if "int8_backend" in report:
        lines.append(f"int8 backend: {report['int8_backend']}")
    if "calibration" in report:
        c = report["calibration"]
        lines.append(f"calibrated on {c['tokens']:,} tokens of {c['data']}")
        if "warning" in c:
            lines.append(f"warning: {c['warning']}")
    return "\n".join(lines)
