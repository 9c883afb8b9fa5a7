"""The KGW watermark: green lists, processed logits and z-scores equal transformers'
`WatermarkLogitsProcessor` / `WatermarkDetector` (same seeding, both schemes, so no test
needs the paper's formula in their place); generation with it is detected and generation
without it is not; the command line and the server carry it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.infer.generate import generate_batch
from lmlab.infer.options import GenerationConfig, WatermarkConfig
from lmlab.infer.watermark import green_ids, watermark_logits
from lmlab.trust.watermark import detect, detect_text
from tests.conftest import lmlab_here

V = 1000
SETTINGS = [  # (scheme, context width, gamma, delta, key)
    ("lefthash", 1, 0.25, 2.0, 15485863),
    ("lefthash", 3, 0.5, 1.5, 7),
    ("selfhash", 1, 0.25, 2.0, 15485863),
    ("selfhash", 4, 0.25, 2.0, 15485863),  # the paper's recommended selfhash width
    ("selfhash", 2, 0.1, 3.0, 2**62 + 11),  # int64 products wrap: seeds must still agree
]


def _theirs(scheme, width, gamma, delta, key):
    gen = pytest.importorskip("transformers.generation")
    settings = {
        "greenlist_ratio": gamma,
        "bias": delta,
        "hashing_key": key,
        "seeding_scheme": scheme,
        "context_width": width,
    }
    processor = gen.WatermarkLogitsProcessor(vocab_size=V, device="cpu", **settings)
    model_config = SimpleNamespace(vocab_size=V, bos_token_id=-1, is_encoder_decoder=False)
    return processor, lambda ignore: gen.WatermarkDetector(
        model_config, "cpu", settings, ignore_repeated_ngrams=ignore
    )


def _ours(scheme, width, gamma, delta, key) -> WatermarkConfig:
    return WatermarkConfig(gamma, delta, scheme, key, width).validate()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s[0]}-w{s[1]}")
def test_green_lists_and_processed_logits_equal_transformers(setting):
    processor, _ = _theirs(*setting)
    cfg = _ours(*setting)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):  # several contexts, ids spanning the vocabulary
        context = torch.randint(0, V, (6,), generator=g)
        assert torch.equal(
            green_ids(context.tolist(), V, cfg), processor._get_greenlist_ids(context)
        )
    assert len(green_ids([3, 4, 5, 6], V, cfg)) == int(V * setting[2])
    # processed logits of a batch: every row biased by its own context
    ids = torch.randint(0, V, (4, 7), generator=g)
    scores = torch.randn(4, V, generator=g)
    ours = watermark_logits(scores, ids.tolist(), cfg)
    assert torch.equal(ours, processor(ids, scores.clone()))
    assert not torch.equal(ours, scores)
    biased = (ours - scores).abs() > 1e-6
    assert torch.allclose((ours - scores)[biased], torch.tensor(setting[3]))
    if setting[0] == "lefthash":  # the whole green list; selfhash: green candidates of 40
        assert biased.sum(-1).tolist() == [int(V * setting[2])] * 4
    else:
        assert (biased.sum(-1) <= 40).all()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s[0]}-w{s[1]}")
def test_z_scores_equal_transformers_with_and_without_repeated_ngrams(setting):
    _, detector = _theirs(*setting)
    cfg = _ours(*setting)
    g = torch.Generator().manual_seed(2)
    # a watermarked-like sequence (biased random logits) with a repeated stretch
    seq = [int(torch.randint(0, V, (1,), generator=g))]
    for _ in range(60):
        logits = watermark_logits(torch.randn(1, V, generator=g) * 2, [seq], cfg)
        seq.append(int(torch.multinomial(logits.softmax(-1), 1, generator=g)))
    seq += seq[10:30] * 3
    for ignore in (True, False):
        theirs = detector(ignore)(torch.tensor([seq]), z_threshold=4.0, return_dict=True)
        ours = detect(seq, V, cfg, ignore_repeated_ngrams=ignore, threshold=4.0)
        assert ours["scored"] == theirs.num_tokens_scored[0]
        assert ours["green"] == theirs.num_green_tokens[0]
        assert ours["z"] == pytest.approx(float(theirs.z_score[0]), abs=1e-9)
        assert ours["p_value"] == pytest.approx(float(theirs.p_value[0]), rel=1e-9, abs=1e-300)
        assert ours["prediction"] == bool(theirs.prediction[0])
    # repeats inflate the count unless ignored
    assert detect(seq, V, cfg, False)["scored"] > detect(seq, V, cfg, True)["scored"]


def test_z_score_is_the_papers_formula_and_bad_input_is_refused():
    cfg = WatermarkConfig()
    seq = list(range(1, 41))
    d = detect(seq, V, cfg)
    gamma, t = 0.25, d["scored"]
    assert t == 39  # every token after the first is scored
    assert d["z"] == pytest.approx((d["green"] - gamma * t) / math.sqrt(t * gamma * (1 - gamma)))
    assert d["p_value"] == pytest.approx(0.5 * math.erfc(d["z"] / math.sqrt(2)))
    with pytest.raises(UsageError, match="at least 2"):
        detect([5], V, cfg)
    with pytest.raises(UsageError, match="token ids"):
        detect([5, V], V, cfg)
    for bad in (
        {"gamma": 1.0},
        {"gamma": 0.0},
        {"delta": -1.0},
        {"delta": float("nan")},
        {"seeding_scheme": "minhash"},
        {"hashing_key": -1},
        {"context_width": 0},
    ):
        with pytest.raises(UsageError, match="watermark"):
            GenerationConfig(watermark=WatermarkConfig(**bad)).validate()


# --- generation with a near-uniform model -------------------------------------------------


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """A tiny checkpoint whose next-token distribution is near uniform (the final norm
    scaled down), so what the watermark does to the choice is not drowned by the model."""
    from lmlab import load_model
    from lmlab.model.checkpoint import save_checkpoint
    from tests.serving import tiny_checkpoint

    root = tmp_path_factory.mktemp("flat")
    model = load_model(tiny_checkpoint(root, max_seq_len=320))
    with torch.no_grad():
        model.norm.weight.mul_(0.02)
    return save_checkpoint(model, root / "flat", tokenizer_dir=root / "tok")


def _sample(model, scheme: str | None, delta: float = 2.0, seed: int = 0):
    wm = None if scheme is None else WatermarkConfig(delta=delta, seeding_scheme=scheme)
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=200, seed=seed, watermark=wm)
    return generate_batch(model, [[5, 6, 7, 8]], cfg)[0].tokens


def test_watermarked_sampling_is_detected_and_plain_sampling_is_not(flat):
    from lmlab import load_model

    model = load_model(flat)
    vocab = model.cfg.vocab_size
    marked = _sample(model, "lefthash")
    assert len(marked) == 200
    assert detect(marked, vocab)["z"] > 4
    plain = _sample(model, None)
    assert abs(detect(plain, vocab)["z"]) < 4
    # selfhash biases only the 40 likeliest candidates (of 320 here, all about equally
    # likely), and with width 1 a unique-token count is small: a stronger bias, repeats counted
    wm = WatermarkConfig(delta=4.0, seeding_scheme="selfhash")
    self_marked = _sample(model, "selfhash", delta=4.0)
    assert detect(self_marked, vocab, wm, ignore_repeated_ngrams=False)["z"] > 4
    assert abs(detect(plain, vocab, wm, ignore_repeated_ngrams=False)["z"]) < 4
    # the wrong key finds nothing
    assert abs(detect(marked, vocab, WatermarkConfig(hashing_key=12345))["z"]) < 4


def test_every_decoding_path_applies_it_or_refuses(flat):
    from lmlab import load_model
    from lmlab.infer.scheduler import Scheduler
    from lmlab.infer.speculative import speculative_generate

    model = load_model(flat)
    wm = WatermarkConfig()
    # greedy: the watermarked argmax is the argmax of the biased logits
    prompt = [5, 6, 7, 8]
    greedy = GenerationConfig(max_new_tokens=1, watermark=wm)
    (c,) = generate_batch(model, [prompt], greedy)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1:].float()
    assert c.tokens == watermark_logits(logits, [prompt], wm).argmax(-1).tolist()
    # batched sampling: the same tokens as one at a time (each row seeded by its own context)
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=30, seed=3, watermark=wm, n=3)
    batch = generate_batch(model, [prompt, [9, 10]], cfg)
    assert all(detect(x.tokens, 320)["green_fraction"] > 0.4 for x in batch)
    # the serving scheduler (paged cache) draws what `generate` draws for a seed
    one = GenerationConfig(temperature=1.0, max_new_tokens=40, seed=4, watermark=wm)
    sched = Scheduler(model, max_batch=4)
    (done,) = sched.run([prompt], [one])
    assert done == generate_batch(model, [prompt], one)[0].tokens
    # beam search runs the log-probs through the same step
    beams = GenerationConfig(num_beams=2, max_new_tokens=5, watermark=wm)
    assert len(generate_batch(model, [prompt], beams)[0].tokens) == 5
    # speculative decoding cannot: its acceptance test needs the models' own distributions
    with pytest.raises(UsageError, match="speculative"):
        speculative_generate(model, model, prompt, one)


def test_generate_then_detect_on_the_command_line(flat, tmp_path, monkeypatch, capsys):
    base = ["generate", str(flat), "--prompt", "The quick brown fox", "--temperature", "1.0"]
    base += ["--max-new-tokens", "200", "--seed", "2", "--json"]
    # re-tokenizing the text of a near-uniform model splits many tokens differently from
    # how they were drawn (a real model's text is mostly canonical): a stronger bias here
    code, out, err = lmlab_here(monkeypatch, capsys, *base, "--watermark", "--watermark-delta", "4")
    assert code == 0, err
    marked = json.loads(out)["text"]
    code, out, err = lmlab_here(monkeypatch, capsys, *base)
    assert code == 0, err
    plain = json.loads(out)["text"]
    (tmp_path / "marked.txt").write_text(marked)
    code, out, err = lmlab_here(
        monkeypatch, capsys, "detect-watermark", "--model", str(flat),
        "--file", str(tmp_path / "marked.txt"), "--json",
    )  # fmt: skip
    assert code == 0, err
    found = json.loads(out)
    assert found["z"] > 4 and found["prediction"] and found["p_value"] < 1e-4
    code, out, err = lmlab_here(
        monkeypatch, capsys, "detect-watermark", plain, "--model", str(flat)
    )
    assert code == 0, err
    assert out.startswith("no watermark found: z = ")
    # bad input: one line, exit 2
    for args in (
        ["detect-watermark", "some text"],
        ["detect-watermark", "--model", str(flat)],
        ["detect-watermark", "x y", "--model", str(flat), "--file", "f"],
        ["detect-watermark", "abc", "--model", str(flat), "--gamma", "1.5"],
        ["detect-watermark", "abc", "--model", str(flat), "--scheme", "minhash"],
        ["detect-watermark", "--model", str(flat), "--file", str(tmp_path / "missing")],
        ["detect-watermark", "a", "--model", str(flat)],
        [*base, "--watermark-gamma", "0.5"],
        [*base, "--watermark", "--watermark-delta", "-1"],
        [*base, "--watermark", "--draft", str(flat)],
    ):
        code, out, err = lmlab_here(monkeypatch, capsys, *args)
        assert code == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1, err


def test_the_servers_watermark_field(flat):
    openai = pytest.importorskip("openai")
    from lmlab import load_model, load_tokenizer
    from lmlab.serve.app import create_app
    from lmlab.serve.engine import EngineLimits, load_engine
    from lmlab.serve.metrics import Metrics
    from tests.serving import running

    engine = load_engine("s", str(flat), EngineLimits(max_concurrency=2), Metrics())
    model, tok = load_model(flat), load_tokenizer(flat)
    prompt = [5, 6, 7, 8]
    wm = WatermarkConfig(delta=4.0)
    with running(create_app({"s": engine})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(
            model="s", prompt=prompt, max_tokens=120, temperature=1.0, seed=7,
            extra_body={"watermark": {"delta": 4.0}, "ignore_eos": True},
        )  # fmt: skip
        text = r.choices[0].text
        # the same tokens as `generate` with the same settings and seed
        cfg = GenerationConfig(temperature=1.0, max_new_tokens=120, seed=7, watermark=wm)
        assert text == tok.decode(generate_batch(model, [prompt], cfg)[0].tokens)
        assert detect_text(text, tok, 320, wm)["z"] > 4
        chat = client.chat.completions.create(
            model="s", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            extra_body={"watermark": True},
        )  # fmt: skip
        assert chat.choices[0].finish_reason in ("stop", "length")
        for bad in (
            {"gamma": 1.5},
            {"scheme": "minhash"},
            {"delta": -2},
            {"colour": "green"},
            "yes please",
        ):
            with pytest.raises(openai.BadRequestError, match="watermark"):
                client.completions.create(
                    model="s", prompt=prompt, max_tokens=2, extra_body={"watermark": bad}
                )
