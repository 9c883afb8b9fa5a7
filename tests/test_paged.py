"""The paged KV cache and the continuous-batching scheduler, against one-by-one generation.

The reference is `lmlab.infer.generate.generate` (a dense `KVCache`, one request at a
time): the scheduler must give the same tokens whatever shares its batch, however its
requests arrive, whether blocks are shared with other prompts and whether sequences are
preempted and recomputed."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.infer.generate import generate
from lmlab.infer.options import GenerationConfig
from lmlab.infer.options import GenerationConfig as RefConfig
from lmlab.infer.paged import BlockAllocator, OutOfBlocks, PagedKVCache, Sequence, block_hash
from lmlab.infer.sampling import History, apply_penalties, make_generator, pick
from lmlab.infer.scheduler import Scheduler
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
VARIANTS = {
    "mha-rope": dict(),
    "gqa-rope": dict(n_kv_heads=2),
    "gqa-sliding-window": dict(n_kv_heads=2, sliding_window=8, sliding_window_every=2),
    "alibi": dict(position="alibi", n_kv_heads=1),
}


@torch.no_grad()
def tiny_model(seed: int = 11, **overrides) -> Transformer:
    """A random fp32 decoder whose greedy path is not degenerate: large residual-branch
    outputs let the layers, not the input token's embedding, pick the next token."""
    kw = dict(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96, max_seq_len=96)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**kw)).float().eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        else:
            gain = 3.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
    return model


def workload(seed: int, n: int = 16, longest: int = 40) -> tuple[list[list[int]], list[int]]:
    """Prompts of mixed lengths (1..longest) and mixed output budgets."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(n)]
    return prompts, [rng.randint(1, 30) for _ in range(n)]


def reference(model, prompts, news, **kw) -> list[list[int]]:
    return [
        generate(model, p, RefConfig(max_new_tokens=m, **kw))
        for p, m in zip(prompts, news, strict=True)
    ]


def run_staggered(sched: Scheduler, prompts, cfgs, every: int = 2) -> dict[int, list[int]]:
    """Requests arrive `every` steps apart, two at a time, while others are decoding; the
    tokens are collected from the event stream."""
    out: dict[int, list[int]] = {}
    ids: list[int] = []
    pending = list(zip(prompts, cfgs, strict=True))
    step = 0
    while pending or sched.has_work():
        if step % every == 0:
            for p, c in pending[:2]:
                ids.append(sched.add(p, c))
            pending = pending[2:]
        for ev in sched.step():
            if ev.finish_reason != "stop":
                out.setdefault(ev.request_id, []).append(ev.token)
        step += 1
    return [out.get(i, []) for i in ids]


def assert_all_free(sched: Scheduler) -> None:
    alloc = sched.cache.alloc
    assert all(r == 0 for r in alloc.ref)
    assert alloc.available == alloc.n_blocks
    assert not sched.running and not sched.waiting


# --- greedy parity -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_one_by_one(variant):
    model = tiny_model(**VARIANTS[variant])
    prompts, news = workload(seed=1)
    ref = reference(model, prompts, news)
    assert len({tuple(r) for r in ref}) == len(ref)  # the outputs are not all alike
    sched = Scheduler(model, block_size=4, max_batch=8)
    got = run_staggered(sched, prompts, [GenerationConfig(max_new_tokens=m) for m in news])
    assert got == ref
    assert sched.stats.peak_batch > 1  # really batched
    assert sched.stats.generated_tokens == sum(len(r) for r in ref)
    assert_all_free(sched)


def test_run_and_stream_agree_and_chunked_prefill():
    model = tiny_model(n_kv_heads=2)
    prompts, news = workload(seed=2, longest=60)
    ref = reference(model, prompts, news)
    cfgs = [GenerationConfig(max_new_tokens=m) for m in news]
    whole = Scheduler(model, block_size=8)
    assert whole.run(prompts, cfgs) == ref
    streamed: dict[int, list[int]] = {}
    streaming = Scheduler(model, block_size=8)
    for p, c in zip(prompts, cfgs, strict=True):
        streaming.add(p, c)
    for ev in streaming.stream():
        streamed.setdefault(ev.request_id, []).append(ev.token)
    assert [streamed[i] for i in range(len(prompts))] == ref
    chunked = Scheduler(model, block_size=8, prefill_chunk=5)
    assert chunked.run(prompts, cfgs) == ref
    assert chunked.stats.forwards > whole.stats.forwards
    # a prompt-token budget per step: the same tokens, never more than 23 prompt tokens a
    # step, and the first request decodes before the last is admitted
    budgeted = Scheduler(model, block_size=8, prefill_budget=23)
    ids = [budgeted.add(p, c) for p, c in zip(prompts, cfgs, strict=True)]
    per_step, first_token_step, admitted_step = [], None, {}
    while budgeted.has_work():
        before = budgeted.stats.prefill_tokens
        events = budgeted.step()
        per_step.append(budgeted.stats.prefill_tokens - before)
        if first_token_step is None and any(e.request_id == ids[0] for e in events):
            first_token_step = len(per_step)
        for r in budgeted.running:
            admitted_step.setdefault(r.id, len(per_step))
    assert max(per_step) <= 23 and sum(per_step) == sum(map(len, prompts))
    assert first_token_step < admitted_step[ids[-1]]
    assert [budgeted.finished.pop(i).output for i in ids] == ref
    with pytest.raises(UsageError, match="prefill_budget"):
        Scheduler(model, prefill_budget=0)


# --- sampling ----------------------------------------------------------------------------


def test_seeded_sampling_is_independent_of_the_batch():
    model = tiny_model(n_kv_heads=2)
    prompts, news = workload(seed=3)
    sampled = dict(max_new_tokens=25, temperature=1.0, top_k=40, top_p=0.9, seed=1234)
    target = prompts[0]
    alone = Scheduler(model, block_size=4).run([target], GenerationConfig(**sampled))[0]
    # the same request amid greedy and other sampled requests, arriving at another step
    others = [
        GenerationConfig(max_new_tokens=m, temperature=0.8 * (i % 2), seed=i)
        for i, m in enumerate(news[1:])
    ]
    cfgs = others[:5] + [GenerationConfig(**sampled)] + others[5:]
    mixed = run_staggered(
        Scheduler(model, block_size=4), prompts[1:6] + [target] + prompts[6:], cfgs
    )
    assert mixed[5] == alone
    assert len(set(alone)) > 5  # a real draw, not a degenerate greedy path
    # the same draws as one-by-one generation with that seed
    kw = {k: v for k, v in sampled.items() if k != "max_new_tokens"}
    assert generate(model, target, RefConfig(max_new_tokens=25, **kw)) == alone
    other_seed = dict(sampled, seed=99)
    assert Scheduler(model).run([target], GenerationConfig(**other_seed))[0] != alone


@torch.no_grad()
def test_penalties_follow_sampling_py():
    """Per-request penalties and history, against a cache-free loop over the same
    sampling.py functions."""
    model = tiny_model()
    prompt = [5, 6, 7, 5, 6]
    cfg = GenerationConfig(
        max_new_tokens=20,
        temperature=0.7,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        no_repeat_ngram_size=2,
        seed=7,
    )
    hist, gen, ids = History([prompt], VOCAB), make_generator(7, "cpu"), list(prompt)
    want = []
    for _ in range(20):
        logits = model(torch.tensor([ids]))[:, -1].float()
        tok = int(pick(apply_penalties(logits, hist, cfg), cfg, gen)[0])
        hist.push([tok])
        ids.append(tok)
        want.append(tok)
    prompts, news = workload(seed=4, n=6)
    cfgs = [GenerationConfig(max_new_tokens=m) for m in news]
    got = Scheduler(model, block_size=4).run(
        prompts[:3] + [prompt] + prompts[3:], cfgs[:3] + [cfg] + cfgs[3:]
    )
    assert got[3] == want


@torch.no_grad()
def test_stop_ids_logprobs_and_length_cap():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    free = generate(model, prompt, RefConfig(max_new_tokens=20))
    stop = free[6]
    cut = free.index(stop)
    sched = Scheduler(model, block_size=4)
    rid = sched.add(prompt, GenerationConfig(max_new_tokens=20, stop_ids=[stop], logprobs=3))
    events = list(sched.stream())
    assert [e.token for e in events] == free[: cut + 1]
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert not any(e.finished for e in events[:-1])
    assert sched.finished[rid].output == free[:cut]
    assert generate(model, prompt, RefConfig(max_new_tokens=20, stop_ids=[stop])) == free[:cut]
    # each logprob is the model's own, from a cache-free forward over the whole sequence
    seq = prompt + free[: cut + 1]
    full = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    for i, e in enumerate(events):
        row = full[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == row.topk(3).indices.tolist()
    # max_seq_len caps a request: the model sees at most 96 positions
    long_prompt = list(range(1, 95))
    sched.add(long_prompt, GenerationConfig(max_new_tokens=10))
    events = list(sched.stream())
    assert len(events) == 3 and events[-1].finish_reason == "length"
    assert_all_free(sched)


# --- what a server needs: samples, stop strings, logit bias, aborts ------------------------


# on a block boundary, with a partial block, a one-token prompt, a prefill in chunks
@pytest.mark.parametrize("prompt_len,chunk", [(8, None), (11, None), (1, None), (9, 4)])
def test_n_samples_prefill_once_and_equal_separately_seeded_requests(prompt_len, chunk):
    model = tiny_model()
    prompt = list(range(5, 5 + prompt_len))
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7, n=3)
    sched = Scheduler(model, block_size=4, prefill_chunk=chunk)
    got = sched.run([prompt], cfg)
    assert sched.stats.prefill_tokens == prompt_len  # one prefill for the three samples
    assert len(got) == 3 and len({tuple(g) for g in got}) > 1
    alone = [
        Scheduler(model, block_size=4, prefix_caching=False).run(
            [prompt], GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7 + i)
        )[0]
        for i in range(3)
    ]
    assert got == alone
    assert_all_free(sched)


def test_forked_samples_share_full_blocks_and_copy_the_partial_one():
    model = tiny_model()
    sched = Scheduler(model, block_size=4)
    rid = sched.add(list(range(1, 11)), GenerationConfig(max_new_tokens=5, n=2))  # 2.5 blocks
    sched.step()  # prefill, fork, first token each
    a, b = sorted(sched.running, key=lambda r: r.id)
    assert [a.id, b.id] == [rid, rid + 1]
    assert a.seq.blocks[:2] == b.seq.blocks[:2]  # the full prompt blocks, shared
    assert a.seq.blocks[2] != b.seq.blocks[2]  # the partial one, copied
    assert all(sched.cache.alloc.ref[x] == 2 for x in a.seq.blocks[:2])
    while sched.has_work():
        sched.step()
    assert sched.finished[rid].output == sched.finished[rid + 1].output  # greedy: the same
    assert sched.finished[rid].output == generate(
        model, list(range(1, 11)), RefConfig(max_new_tokens=5)
    )
    assert_all_free(sched)


def byte_tokenizer():
    """A byte-level BPE of exactly the tiny model's 300 ids, so its outputs decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "every",
        "dog",
        "ran",
        "off",
        "quickly",
        "into",
        "green",
        "fields",
    ]
    text = " ".join(w1 + w2 for w1 in words for w2 in words)
    tok.train_from_iterator([text] * 5, trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok


def test_stop_strings_end_a_request_as_generate_does():
    from lmlab.infer.generate import generate_batch

    model, tok = tiny_model(), byte_tokenizer()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    free = generate(model, prompt, RefConfig(max_new_tokens=30))
    text = tok.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and stop in text
    cfg = GenerationConfig(max_new_tokens=30, stop_strings=[stop])
    ref = generate_batch(model, [prompt], cfg, tokenizer=tok)[0]
    assert ref.finish_reason == "stop" and len(ref.tokens) < len(free)
    sched = Scheduler(model, block_size=4, tokenizer=tok)
    rid = sched.add(prompt, cfg)
    events = list(sched.stream())
    assert events[-1].finish_reason == "stop"
    assert sched.finished[rid].output == ref.tokens  # runs to the token completing the stop
    assert stop in tok.decode(ref.tokens) and stop not in tok.decode(ref.tokens[:-1])
    assert_all_free(sched)


def test_logit_bias_steers_greedy_as_generate_does():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5]
    free = generate(model, prompt, RefConfig(max_new_tokens=6))
    cfg = GenerationConfig(max_new_tokens=6, logit_bias={17: 100.0, free[0]: -100.0})
    steered = generate(model, prompt, cfg)
    assert steered == [17] * 6
    assert Scheduler(model, block_size=4).run([prompt], cfg) == [steered]


def test_abort_frees_blocks_at_once_and_keeps_unforked_samples():
    model = tiny_model()
    sched = Scheduler(model, block_size=4, max_batch=4)
    keep = sched.add([1, 2, 3, 4, 5], GenerationConfig(max_new_tokens=20))
    gone = sched.add([6, 7, 8, 9, 10, 11], GenerationConfig(max_new_tokens=20))
    sched.step()
    sched.step()
    used = sched.cache.alloc.used
    sched.abort([gone])
    assert sched.cache.alloc.used < used and [r.id for r in sched.running] == [keep]
    # a request still queued with its samples: the parent goes, its samples are queued alone
    parent = sched.add([1, 2, 3], GenerationConfig(max_new_tokens=3, n=3))
    sched.abort([parent])
    assert [r.id for r in sched.waiting] == [parent + 1, parent + 2]
    sched.abort([parent + 1, parent + 2])
    while sched.has_work():
        sched.step()
    assert set(sched.finished) == {keep}
    assert sched.finished[keep].output == generate(
        model, [1, 2, 3, 4, 5], RefConfig(max_new_tokens=20)
    )
    assert_all_free(sched)


# --- prefix sharing ----------------------------------------------------------------------


@torch.no_grad()
def test_prefix_blocks_are_shared_never_written_and_freed():
    model = tiny_model(n_kv_heads=2)
    bs = 4
    common = [11, 12, 13, 14, 15, 16, 17, 18]  # two full blocks
    a = common + [20, 21, 22]
    b = common + [30, 31]
    c = common[:4] + [40, 41, 42, 43, 44]  # shares only the first block
    d = [50, 51, 52, 53] + common[4:] + [60]  # same second block, other parent: no sharing
    prompts = [a, b, c, d]
    ref = reference(model, prompts, [12] * 4)
    sched = Scheduler(model, block_size=bs)
    cfg = GenerationConfig(max_new_tokens=12)
    ida = sched.add(a, cfg)
    sched.step()  # a is prefilled and its two full prompt blocks are named
    seq_a = sched.running[0].seq
    shared = seq_a.blocks[:2]
    slots = torch.tensor([blk * bs + i for blk in shared for i in range(bs)])
    before = sched.cache.k[:, slots].clone(), sched.cache.v[:, slots].clone()
    ids = [ida] + [sched.add(p, cfg) for p in (b, c, d)]
    sched.step()
    seqs = {r.id: r.seq for r in sched.running}
    assert seqs[ids[1]].blocks[:2] == shared
    assert seqs[ids[2]].blocks[0] == shared[0] and seqs[ids[2]].blocks[1] != shared[1]
    assert not set(seqs[ids[3]].blocks) & set(shared)
    assert [sched.cache.alloc.ref[blk] for blk in shared] == [3, 2]
    assert sched.stats.prefix_hit_tokens == 8 + 4
    while sched.has_work():
        sched.step()
    assert [sched.finished[i].output for i in ids] == ref
    assert torch.equal(sched.cache.k[:, slots], before[0])  # a shared block is never written
    assert torch.equal(sched.cache.v[:, slots], before[1])
    assert_all_free(sched)
    # the freed blocks stay cached: the same prompt again is a prefix hit
    hits = sched.stats.prefix_hit_tokens
    assert sched.run([b], cfg) == [ref[1]]
    assert sched.stats.prefix_hit_tokens == hits + 8
    # a prompt that is all cached blocks still recomputes its last token's logits
    assert sched.run([common], cfg) == reference(model, [common], [12])


def test_prefix_caching_off_changes_nothing_but_the_hits():
    model = tiny_model()
    common = list(range(100, 120))
    prompts = [common + [i] for i in range(6)]
    ref = reference(model, prompts, [10] * 6)
    on, off = Scheduler(model, block_size=4), Scheduler(model, block_size=4, prefix_caching=False)
    cfg = GenerationConfig(max_new_tokens=10)
    assert on.run(prompts, cfg) == ref == off.run(prompts, cfg)
    assert on.stats.prefix_hit_tokens == 5 * 20 and off.stats.prefix_hit_tokens == 0
    assert on.stats.peak_blocks_used < off.stats.peak_blocks_used


# --- out of blocks -----------------------------------------------------------------------


def test_out_of_blocks_preempts_and_recomputes():
    model = tiny_model(n_kv_heads=2)
    prompts, news = workload(seed=5)
    ref = reference(model, prompts, news)
    need = max(-(-(len(p) + m - 1) // 4) for p, m in zip(prompts, news, strict=True))
    sched = Scheduler(model, block_size=4, n_blocks=need + 3)
    got = run_staggered(sched, prompts, [GenerationConfig(max_new_tokens=m) for m in news])
    assert got == ref
    assert sched.stats.preemptions > 0
    assert sched.stats.peak_blocks_used <= need + 3
    assert_all_free(sched)
    # the tightest cache: one request at a time still finishes everything
    tight = Scheduler(model, block_size=4, n_blocks=need)
    assert tight.run(prompts, [GenerationConfig(max_new_tokens=m) for m in news]) == ref
    assert_all_free(tight)


def test_allocator_refcounts_lru_and_exhaustion():
    alloc = BlockAllocator(3)
    blocks = [alloc.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and alloc.available == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    h0, h1 = block_hash(b"", [1, 2]), block_hash(b"", [3, 4])
    assert block_hash(h0, [3, 4]) != h1  # the name covers the parent
    alloc.register(blocks[0], h0)
    alloc.register(blocks[1], h1)
    assert alloc.lookup(h0) == blocks[0] and alloc.ref[blocks[0]] == 2
    alloc.release(blocks[0])
    alloc.release(blocks[0])  # ref 0, named: cached, still found
    alloc.release(blocks[1])
    alloc.release(blocks[2])  # unnamed: plain free
    with pytest.raises(RuntimeError, match="released twice"):
        alloc.release(blocks[2])
    assert alloc.available == 3 and list(alloc.lru) == [blocks[0], blocks[1]]
    assert alloc.allocate() == blocks[2]  # a never-named block goes first
    assert alloc.allocate() == blocks[0]  # then the least recently freed cached one
    assert alloc.lookup(h0) is None and alloc.lookup(h1) == blocks[1]


def test_cache_refuses_to_write_a_shared_block():
    cache = PagedKVCache.for_model(tiny_model(), n_blocks=8, block_size=4)
    first, second = Sequence(list(range(1, 10))), Sequence(list(range(1, 10)))
    cache.reserve(first, 9)
    cache.prefill_view(first, 9).advance(9)  # stores (and names) two full blocks
    assert cache.match_prefix(second) == 8 and second.blocks == first.blocks[:2]
    second.n_cached = 4  # as if it were to rewrite its second, shared, block
    cache.reserve(second, 5)
    with pytest.raises(RuntimeError, match="shared"):
        cache.prefill_view(second, 5)
    named = first.blocks[:2]
    cache.release(first)
    cache.release(second)
    assert cache.alloc.available == 8
    assert list(cache.alloc.lru) == named[::-1]  # a prefix's tail is evicted before its head


# --- bad input ---------------------------------------------------------------------------


def test_bad_input_is_a_usage_error():
    model = tiny_model()
    sched = Scheduler(model, block_size=4, n_blocks=6)
    with pytest.raises(UsageError, match="max_len=96"):
        sched.add(list(range(97)))
    with pytest.raises(UsageError, match="max_len must be in"):
        Scheduler(model, max_len=97)
    with pytest.raises(UsageError, match="needs 8 blocks of 4; the cache has 6"):
        sched.add(list(range(20)), GenerationConfig(max_new_tokens=10))
    with pytest.raises(UsageError, match="empty prompt"):
        sched.add([])
    with pytest.raises(UsageError, match=r"\[0, 300\)"):
        sched.add([1, 300])
    with pytest.raises(UsageError, match="num_beams"):
        sched.add([1, 2], GenerationConfig(num_beams=2))
    with pytest.raises(UsageError, match="stop_strings.*no tokenizer"):
        sched.add([1, 2], GenerationConfig(stop_strings=["x"]))
    with pytest.raises(UsageError, match="n is not supported"):
        Scheduler(model, max_batch=2).add([1, 2], GenerationConfig(n=3))
    with pytest.raises(UsageError, match="logit_bias token ids"):
        sched.add([1, 2], GenerationConfig(logit_bias={300: 1.0}))
    with pytest.raises(UsageError, match="logit-bias values"):
        sched.add([1, 2], GenerationConfig(logit_bias={3: 101.0}))
    with pytest.raises(UsageError, match="temperature"):
        sched.add([1, 2], GenerationConfig(temperature=-1))
    with pytest.raises(UsageError, match="prefix"):
        Scheduler(Transformer(ModelConfig(vocab_size=64, family="prefix", d_model=32)))
    with pytest.raises(UsageError, match="block_size"):
        Scheduler(model, block_size=0)
    # a rejected batch queues nothing
    with pytest.raises(UsageError):
        sched.run([[1, 2], []])
    assert not sched.has_work()
    assert sched.run([[1, 2]], GenerationConfig(max_new_tokens=3)) == reference(
        model, [[1, 2]], [3]
    )
