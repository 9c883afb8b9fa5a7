"""In-context learning's choices: demonstration selection (random, BM25, KATE's nearest
neighbours, maximal marginal relevance), order (similarity, GlobalE's entropy), and
contextual calibration, against references and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab.errors import UsageError
from lmlab.prompt.demos import (
    contextual_calibration,
    generated_probe,
    global_entropy,
    label_probs,
    order_demos,
    select_demos,
)

POOL = [
    "the film was a joy from start to finish",
    "a dull, lifeless movie",
    "stocks fell sharply on monday",
    "a wonderful, moving film with great actors",
    "the committee approved the budget",
    "boring and far too long",
]


class Fixed:
    """An encoder whose vectors are given: the query's first, then the pool's."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.vectors[t] for t in texts]), dim=-1)


def test_kate_returns_the_true_nearest_neighbours():
    st = pytest.importorskip("sentence_transformers")
    from lmlab.model.sentence import default_encoder_dir

    query = "an excellent film, I loved it"
    ref = st.SentenceTransformer(str(default_encoder_dir()), device="cpu")
    sims = ref.encode(POOL) @ ref.encode([query])[0]
    want = [int(i) for i in np.argsort(-sims)[:3]]
    assert select_demos(query, POOL, 3, "knn") == want
    assert want[0] in (0, 3)


def test_mmr_trades_relevance_for_diversity():
    vecs = {"q": [1.0, 0.0], "a": [1.0, 0.05], "a2": [1.0, 0.06], "b": [0.5, -0.866]}
    pool = ["a", "a2", "b"]
    enc = Fixed(vecs)
    assert select_demos("q", pool, 2, "knn", encoder=enc) == [0, 1]  # the two near-copies
    assert select_demos("q", pool, 2, "mmr", encoder=enc, lam=0.5) == [0, 2]  # not a copy
    assert select_demos("q", pool, 2, "mmr", encoder=enc, lam=1.0) == [0, 1]  # λ = 1: kNN


def test_bm25_selection_follows_bm25s_and_random_is_seeded():
    bm25s = pytest.importorskip("bm25s")
    query = "a boring film"
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(POOL, stopwords="en", show_progress=False), show_progress=False)
    scores = ref.get_scores(bm25s.tokenize([query], stopwords="en", return_ids=False)[0])
    assert select_demos(query, POOL, 2, "bm25") == [int(i) for i in np.argsort(-scores)[:2]]
    drawn = select_demos(query, POOL, 4, "random", seed=3)
    assert drawn == select_demos(query, POOL, 4, "random", seed=3) and len(set(drawn)) == 4
    with pytest.raises(UsageError, match="pool has 6"):
        select_demos(query, POOL, 7, "random")
    with pytest.raises(UsageError, match="choose one of"):
        select_demos(query, POOL, 1, "nearest")


def test_orders_by_similarity_and_by_global_entropy():
    assert order_demos([7, 8, 9], "similarity", similarity=[0.9, 0.1, 0.5]) == [8, 9, 7]

    def probe(order):  # orderings that end with demo 2 predict label 0 for every probe
        if order[-1] == 2:
            return np.array([[0.9, 0.1]] * 4)
        return np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])

    best = order_demos([0, 1, 2], "entropy", seed=0, probe=probe, candidates=6)
    assert best[-1] != 2
    assert global_entropy(probe(best)) == pytest.approx(np.log(2))
    assert global_entropy(np.array([[0.9, 0.1]] * 3)) == 0.0


class Scripted:
    """log p(word | prompt) from a table: a prompt that ends with "N/A" is biased."""

    name = "scripted"

    def logprobs(self, pairs):
        table = {" positive": np.log(0.7), " negative": np.log(0.1)}
        return [table[w] + (0.0 if p.endswith("N/A") else (-1.0 if "bad" in p else 0.0))
                for p, w in pairs]  # fmt: skip


def test_contextual_calibration_divides_out_the_content_free_bias():
    labels = [" positive", " negative"]
    probs = label_probs(Scripted(), ["good film", "bad film"], labels)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(-1), 1)
    cf = label_probs(Scripted(), ["N/A"], labels)[0]
    assert cf == pytest.approx([0.875, 0.125])
    calibrated = contextual_calibration(probs, cf)
    # W = diag(1/p_cf): the content-free input itself becomes uniform
    assert contextual_calibration(cf[None], cf)[0] == pytest.approx([0.5, 0.5])
    want = (probs / cf) / (probs / cf).sum(-1, keepdims=True)
    assert np.allclose(calibrated, want)


def test_an_eval_task_names_its_demo_selector(tmp_path):
    from lmlab.eval.tasks import fewshot_docs, load_task

    rows = [{"text": t, "label": i % 2} for i, t in enumerate(POOL)]
    (tmp_path / "train.jsonl").write_text(
        "".join(f'{{"text": "{r["text"]}", "label": {r["label"]}}}\n' for r in rows)
    )
    (tmp_path / "test.jsonl").write_text('{"text": "a boring film, far too long", "label": 1}\n')
    spec = ("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: train.jsonl\n"
            "    test: test.jsonl\ntest_split: test\nfewshot_split: train\nnum_fewshot: 2\n"
            "output_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_choice: ['no', 'yes']\n"
            "doc_to_target: label\n")  # fmt: skip
    (tmp_path / "t.yaml").write_text(spec + "fewshot_selector: bm25\nfewshot_order: similarity\n")
    task = load_task(tmp_path / "t.yaml")
    doc = {"text": "a boring film, far too long", "label": 1}
    shots = fewshot_docs(task, np.random.default_rng(0), doc)
    best = select_demos(doc["text"], POOL, 2, "bm25")
    assert [s["text"] for s in shots] == [POOL[i] for i in best[::-1]]  # most similar last
    (tmp_path / "bad.yaml").write_text(spec + "fewshot_selector: psychic\n")
    with pytest.raises(UsageError, match="fewshot_selector 'psychic'"):
        load_task(tmp_path / "bad.yaml")


def test_a_prompt_from_the_surveys_components_and_named_tips(tmp_path):
    from lmlab.prompt.components import TIPS, load_prompt, prompt_messages, render_prompt

    (tmp_path / "p.yaml").write_text(
        "task: Classify the sentiment of the review.\n"
        "context: 'Reviews come from {{ site }}.'\n"
        "demos:\n  - {input: 'A joy.', output: positive}\n"
        "input: '{{ review }}'\noutput_format: one word\ntips: [clear_goal, delimit_input]\n"
    )
    spec = load_prompt(tmp_path / "p.yaml")
    text = render_prompt(spec, {"site": "a forum", "review": "Dull."})
    assert text == (
        f"Classify the sentiment of the review. {TIPS['clear_goal']} {TIPS['delimit_input']}\n\n"
        "Context: Reviews come from a forum.\n\nInput: ```\nA joy.\n```\nOutput: positive\n\n"
        "Output format: one word\n\nInput: ```\nDull.\n```\nOutput:"
    )
    system, user = prompt_messages(spec, {"site": "a forum", "review": "Dull."})
    assert system["role"] == "system" and user["content"].endswith("Dull.\n```\nOutput:")
    for bad, words in [({"tips": ["be_nice"]}, "known tips"), ({"shots": []}, "unknown key"),
                       ({"demos": [{"input": "x"}]}, r"demos\[0\]")]:  # fmt: skip
        with pytest.raises(UsageError, match=words):
            load_prompt(bad)
    with pytest.raises(Exception, match="review"):  # a variable left out is an error
        render_prompt(spec, {"site": "x"})


def test_label_words_after_one_prompt_share_one_forward(tmp_path):
    """Scoring pairs that share their model input runs it once, and gives what scoring
    each pair on its own gives (one-token and longer continuations mixed)."""
    from lmlab import load_model, load_tokenizer
    from lmlab.prompt.likelihood import encode_pair, score_continuations
    from tests.serving import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "m")
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    prompts = ["Review: a fine film\nSentiment:", "Review: dull\nSentiment:"]
    short = [w for w in (" the", " a", " is", " was", " it", " of", " x", " b")
             if len(encode_pair(tok, prompts[0], w)[1]) == 1]  # fmt: skip
    words = short[:3] + [" it was fine"]
    assert len(short) >= 2
    pairs = [encode_pair(tok, p, w) for p in prompts for w in words]
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    together = score_continuations(model, pairs, batch_size=64)
    hook.remove()
    alone = [score_continuations(model, [p])[0] for p in pairs]
    for (a, ga), (b, gb) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-5) and ga == gb
    one_token = [len(k) == 1 for _, k in pairs]
    distinct = {tuple(c + k[:-1]) for c, k in pairs}
    assert sum(calls) == len(distinct) < len(pairs) and any(one_token)


def test_the_probe_set_is_written_by_the_model_itself():
    """Lu et al.'s probe: sampled inputs after the demonstrations, first lines only,
    empties and repeats dropped; temperature 1 and n samples in one request."""

    class Sampler:
        def __init__(self):
            self.calls = []

        def complete(self, prompts, cfg):
            self.calls.append((prompts, cfg))
            return [[" a warm film\nSentiment: positive", " a warm film", "", " dull\nx"]]

    demos = "Review: fine\nSentiment: positive\n\n"
    b = Sampler()
    assert generated_probe(b, demos, "Review:", 4, seed=3) == ["a warm film", "dull"]
    ((prompts, cfg),) = b.calls
    assert prompts == [demos + "Review:"] and cfg.n == 4 and cfg.temperature == 1.0
    assert cfg.seed == 3
    with pytest.raises(UsageError, match="n must be >= 1"):
        generated_probe(b, demos, "Review:", 0)
