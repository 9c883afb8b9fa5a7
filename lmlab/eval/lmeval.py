"""lmlab models inside lm-evaluation-harness (EleutherAI's `lm_eval`, tested with 0.4.13).

Importing this module registers `LmlabLM` as the lm-eval model "lmlab", so any lm-eval task
runs on an lmlab checkpoint, and the scores can be compared with any other lm-eval model:

    import lmlab.eval.lmeval  # registers "lmlab"
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    simple_evaluate(model="lmlab", model_args="path=runs/tiny,batch_size=8",
                    tasks=["lmlab_python_mc"],
                    task_manager=TaskManager(include_path="tests/data/lmeval_tasks",
                                             include_defaults=False))

(`include_defaults=False` skips indexing lm-eval's ~15,000 bundled tasks, about 13 s.) A
task YAML reads local data with `dataset_path: json` and `dataset_kwargs: {data_files: ...}`;
`datasets` resolves a relative data_files path against the current directory, not the
YAML's, so the example tasks name theirs from the repository root.

lm-eval 0.4.13 finds models only through imports (its registry has no plugin entry point),
so the shell command is this module, which registers the model then runs lm-eval's own CLI
with the same arguments:

    python -m lmlab.eval.lmeval --model lmlab --model_args path=runs/tiny \\
        --include_path tests/data/lmeval_tasks --tasks lmlab_local --batch_size 8

The three request types follow lm-eval's `HFLM`, so for a model exported to Hugging Face
(`lmlab export`) `--model hf` gives the same numbers (tested to 1e-4):

- `loglikelihood`: the context and continuation are encoded as one string and split at the
  context's length, a context's trailing whitespace moving to the continuation (lm-eval's
  `TemplateLM`, shared with `HFLM`). Requests run longest first in batches, right-padded (the
  model is causal, so padding after a row never changes it), each left-truncated to the
  model's context.
- `loglikelihood_rolling`: the document in disjoint windows of the whole context (lm-eval's
  `get_rolling_token_windows` / `make_disjoint_window`), the first conditioned on EOS.
- `generate_until`: `lmlab.infer.generate_batch`, greedy unless the task sets `do_sample` /
  `temperature`; `until` strings and EOS stop it, `max_gen_toks` bounds it, and the prompt
  keeps its last `max_length - max_gen_toks` tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmlab.errors import UsageError
from lmlab.prompt.likelihood import score_continuations

__all__ = ["LmlabLM", "main"]

log = logging.getLogger(__name__)

# generation options a task's `generation_kwargs` may set, beyond until / max_gen_toks /
# do_sample / temperature, mapped onto GenerationConfig fields of the same name
GEN_OPTIONS = ("top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "seed")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default, capped to half the context below


def _special_token(tok_file: Path, key: str) -> str | None:
    """A special token's text from the tokenizer_config.json beside tokenizer.json."""
    cfg = tok_file.parent / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    value = json.loads(cfg.read_text()).get(key)
    return value.get("content") if isinstance(value, dict) else value


def _positive_int(key: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"lm-eval model_args {key}={value!r}: must be a positive integer")
    return n


class LmlabLM(TemplateLM):
    """An lmlab checkpoint (or run directory, or Hugging Face directory lmlab converts) as an
    lm-eval model. `model_args`: path (required), batch_size (8), device (cuda if present,
    else cpu), max_length (the model's max_seq_len), max_gen_toks (256, at most half the
    context), seed (0, for sampled generation)."""

    def __init__(
        self,
        path: str | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str | None = None,
        seed: int | str = 0,
        **unused: Any,
    ) -> None:
        super().__init__()
        from lmlab import load_model, load_tokenizer
        from lmlab.tokenizer import EOS, find_tokenizer_file

        unused.pop("max_batch_size", None)  # passed by lm-eval for batch_size=auto
        if unused:
            raise UsageError(
                f"lm-eval model_args: unknown {', '.join(sorted(unused))} (allowed: path, "
                "batch_size, device, max_length, max_gen_toks, seed)"
            )
        if not path:
            raise UsageError("lm-eval model_args: path=CHECKPOINT is required")
        self.path = str(path)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's CLI passes device=cuda:0 unless told otherwise; like HFLM, a device
            # that is not there means "the best one that is"
            if device is not None:
                log.warning("lmlab: device %s is not available, using the best one that is", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model = load_model(self.path, device=str(self._device))
        self.cfg = getattr(self.model, "cfg", None)
        if self.cfg is None:
            raise UsageError(f"{path}: lmlab cannot convert this model; use lm-eval's 'hf' model")
        if self.cfg.family == "encoder_decoder":
            raise UsageError(
                f"{path}: family encoder_decoder is not supported by the lm-eval model "
                "(decoder and prefix families are)"
            )
        tok_file = find_tokenizer_file(self.path)
        self.tok = load_tokenizer(tok_file)
        eos = _special_token(tok_file, "eos_token") or EOS
        eos_id = self.tok.token_to_id(eos)
        if eos_id is None:
            raise UsageError(f"{tok_file}: no end-of-text token {eos!r} in the vocabulary")
        self._eot_id, self._eos_text = eos_id, eos
        bos = _special_token(tok_file, "bos_token")
        self._prefix_id = self.tok.token_to_id(bos) if bos else None
        # `batch_size=auto` (lm-eval's memory probe) has no meaning on CPU: use the default
        self._batch_size = 8 if str(batch_size).startswith("auto") else None
        self._batch_size = self._batch_size or _positive_int("batch_size", batch_size)
        limit = self.cfg.max_seq_len
        self._max_length = _positive_int("max_length", max_length) if max_length else limit
        if self._max_length > limit and self.cfg.position == "learned":
            raise UsageError(
                f"lm-eval model_args max_length={self._max_length}: learned positions stop "
                f"at the model's max_seq_len {limit}"
            )
        self._max_gen_toks = (
            _positive_int("max_gen_toks", max_gen_toks)
            if max_gen_toks
            else min(DEFAULT_MAX_GEN_TOKS, self._max_length // 2)
        )
        if not str(seed).lstrip("-").isdigit():
            raise UsageError(f"lm-eval model_args seed={seed!r}: must be an integer")
        self.seed = int(seed)

    # --- what lm-eval reads -------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lm-eval's, except that a key given in both model_args and lm-eval's own
        options (`--batch_size` defaults to 1 on the CLI) takes the model_args value instead
        of failing with a duplicate keyword."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS when the
        tokenizer has one, else EOS (as HFLM)."""
        return self._prefix_id if self._prefix_id is not None else self._eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def get_model_info(self) -> dict:
        return {
            "model_path": self.path,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_family": self.cfg.family,
            "max_length": self._max_length,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """Token ids; special tokens the tokenizer's post-processor adds (a BOS) are kept
        unless `add_special_tokens=False`, as HFLM's default."""
        return self.tok.encode(string, add_special_tokens=add_special_tokens is not False).ids

    # --- scoring ------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kw
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding yields it) for each
        (cache key, context ids, continuation ids), by lmlab's shared scorer."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        try:
            out = score_continuations(self.model, pairs, self._batch_size, self._max_length)
        except UsageError as e:
            raise UsageError(f"lm-eval request: {e}") from None
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood over disjoint windows of `max_length` tokens:
        every token predicted exactly once, with as much context as fits."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[r] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------

    def _generation_config(self, gen_kwargs: dict):
        """lm-eval's generation_kwargs as a GenerationConfig; unknown options are an error,
        so a task never silently decodes differently from what it asked."""
        from lmlab.infer import GenerationConfig

        kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text)
        budget = int(kwargs.pop("max_gen_toks"))
        if budget >= self._max_length:
            raise UsageError(
                f"lm-eval generation_kwargs max_gen_toks={budget}: must be below the model's "
                f"context of {self._max_length} tokens, to leave room for the prompt"
            )
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample and temperature == 0.0:
            temperature = 1.0  # transformers' default when sampling
        options = {k: kwargs.pop(k) for k in GEN_OPTIONS if k in kwargs}
        if kwargs:
            raise UsageError(
                f"lm-eval generation_kwargs: unsupported {', '.join(sorted(kwargs))} "
                f"(allowed: until, max_gen_toks, do_sample, temperature, {', '.join(GEN_OPTIONS)})"
            )
        options.setdefault("seed", self.seed)
        cfg = GenerationConfig(
            max_new_tokens=budget,
            temperature=temperature if do_sample else 0.0,
            stop_ids=[self._eot_id],
            stop_strings=[s for s in until if s and s != self._eos_text],
            **options,
        )
        return cfg.validate(), until, self._max_length - budget

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations for (context, gen_kwargs) requests: grouped by their options, longest
        prompt first in batches; each cut before its first stop string."""
        from lmlab.infer import generate_batch

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        encoded = [self.tok_encode(req.args[0]) or [self.prefix_token_id] for req in requests]
        out: list[str | None] = [None] * len(requests)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            cfg, until, room = self._generation_config(gen_kwargs)
            idx = sorted(idx, key=lambda i: -len(encoded[i]))
            for start in range(0, len(idx), self._batch_size):
                batch = idx[start : start + self._batch_size]
                prompts = [encoded[i][-room:] for i in batch]  # HFLM's left truncation
                comps = generate_batch(self.model, prompts, cfg, self.tok)
                for i, c in zip(batch, comps, strict=True):
                    text = postprocess_generated_text(c.text or "", until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


def _check_model_path(args: list[str]) -> None:
    """The lmlab model's `path=` checked before lm-eval starts: its CLI reads all of its
    ~14k task files first, so a wrong path would take half a minute to be reported."""
    from lmlab.model.loading import find_format

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    if value("--model") != "lmlab":
        return
    for item in (value("--model_args") or "").split(","):
        key, _, path = item.partition("=")
        if key.strip() == "path" and path.strip():
            find_format(path.strip())


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "lmlab" model registered (`lm_eval` itself cannot
    see it: lm-eval 0.4.13 discovers models by import only)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        _check_model_path(sys.argv[1:])
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except UsageError as e:  # DESIGN.md: bad usage is one line and exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    # run as a script this file is `__main__`: register through the module's own name, so
    # a later `import lmlab.eval.lmeval` finds the same class, not a second "lmlab"
    import lmlab.eval.lmeval as _canonical

    _canonical.main()
else:
    register_model("lmlab")(LmlabLM)
