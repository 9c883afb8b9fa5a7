"""A paged KV cache (Kwon et al. 2023, "PagedAttention", the idea behind vLLM).

Why paging: a cache preallocated per sequence for its longest possible length wastes the
slots it never fills (internal fragmentation) and, between sequences of different sizes,
leaves holes no new sequence fits (external fragmentation); vLLM measured 60-80% of KV
memory wasted that way. Here every layer's keys and values live in one pool of fixed-size
blocks; a sequence holds a *block table* (its logical block i -> a physical block), takes
a block only when its previous one is full, and gives them all back when it finishes, so
at most `block_size - 1` slots per sequence are ever idle.

Prefix sharing: a full block is named by a hash of (its parent block's hash, its token
ids), so the name covers the whole prefix up to it. A new sequence whose tokens begin
with blocks already cached takes them (reference count + 1) and computes only the rest.
Only *full* blocks are ever shared, and a sequence writes only at slots past its cached
prefix, so a shared block is never written and no copy-on-write is needed: the first write
of a sequence that shares a prefix lands in a fresh block of its own. Freed blocks keep
their hash in an LRU and are handed out again only when no never-used block is left, so
a prompt seen earlier (a system prompt, a preempted sequence) is found again for free.

The model talks to a cache only through `pos`, `capacity`, `update(layer, k, v)` and
`advance(t)` (see `lmlab.model.transformer.KVCache`); `PagedView` implements them for one
forward over a batch of sequences, gathering each row's keys into a dense tensor (a fused
paged-attention kernel would read the blocks in place; this is the plain-PyTorch form).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from lmlab.errors import UsageError
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer


def check_model(model: torch.nn.Module) -> Transformer:
    """The paged cache serves causal decoders only: a prefix decoder's prompt attends both
    ways (its K/V depend on the whole prompt, so blocks are not a prefix's alone) and an
    encoder-decoder caches the decoder side only."""
    if not isinstance(model, Transformer) or model.cfg.family != "decoder":
        family = getattr(getattr(model, "cfg", None), "family", type(model).__name__)
        raise UsageError(
            f"paged KV cache: model family {family!r} is not supported; "
            "only causal decoders (family: decoder) are"
        )
    if "virtual_prompt" in model._modules:
        raise UsageError(
            f"paged KV cache: a {model.peft_config.method}-tuning adapter puts virtual tokens "
            "before every sequence, which the paged cache does not hold; generate or chat with "
            "it (lmlab generate/chat ADAPTER), or serve a LoRA, DoRA, IA³ or bottleneck adapter"
        )
    return model


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    """The name of a full block: SHA-256 of the parent's name and the block's token ids.
    A cryptographic hash, so two different prefixes never share K/V by a collision."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class OutOfBlocks(RuntimeError):
    """No free block: the scheduler checks `available` first and preempts; never raised to
    a user."""


class BlockAllocator:
    """A free list, a reference count per block, and the prefix cache (hash -> block).

    A block is in exactly one state: free (never used, or freed without a hash), in use
    (ref > 0), or cached (ref == 0 but its hash is kept, in LRU order, until `allocate`
    needs it)."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.ref = [0] * n_blocks
        self.free: deque[int] = deque(range(n_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, oldest first

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out: free plus cached (evictable) ones."""
        return len(self.free) + len(self.lru)

    @property
    def used(self) -> int:
        return self.n_blocks - self.available

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)  # evict the least recently freed
            del self.by_hash[self.hash_of.pop(block)]
        else:
            raise OutOfBlocks("paged KV cache: no free block")
        self.ref[block] = 1
        return block

    def lookup(self, h: bytes) -> int | None:
        """The cached block named `h`, with a reference taken, or None."""
        block = self.by_hash.get(h)
        if block is None:
            return None
        if self.ref[block] == 0:
            del self.lru[block]
        self.ref[block] += 1
        return block

    def register(self, block: int, h: bytes) -> None:
        """Name a block that just became full. If an equal block is already named (two
        sequences produced the same tokens), the first keeps the name; this one stays
        private and goes back to the free list when released."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def share(self, block: int) -> None:
        """One more holder of a block already in use (a forked sample's prompt)."""
        if self.ref[block] <= 0:
            raise RuntimeError(f"paged KV cache: block {block} is not in use and cannot be shared")
        self.ref[block] += 1

    def release(self, block: int) -> None:
        if self.ref[block] <= 0:
            raise RuntimeError(f"paged KV cache: block {block} released twice")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.hash_of:
                self.lru[block] = None
            else:
                self.free.append(block)


@dataclass
class Sequence:
    """One sequence's view of the cache: its tokens (prompt + generated), block table, and
    how many of its tokens already have keys/values in the cache (`n_cached`). The tokens
    past `n_cached` are the next forward's input."""

    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # names of its first full blocks
    n_cached: int = 0

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.n_cached


class PagedKVCache:
    """Key and value pools [layers, n_blocks · block_size + 1, kv_heads, head_dim].

    Slot `block · block_size + offset` holds one token's keys/values; the extra last slot
    pads the shorter rows of a batch (always masked out; padding queries write their
    finite, unused keys there)."""

    def __init__(
        self,
        cfg: ModelConfig,
        n_blocks: int,
        block_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if n_blocks < 1:
            raise UsageError(f"paged KV cache: n_blocks must be >= 1, got {n_blocks}")
        if block_size < 1:
            raise UsageError(f"paged KV cache: block_size must be >= 1, got {block_size}")
        self.cfg = cfg
        self.block_size = block_size
        self.alloc = BlockAllocator(n_blocks)
        shape = (cfg.n_layers, n_blocks * block_size + 1, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pad_slot = n_blocks * block_size
        self.peak_used = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_blocks: int, block_size: int = 16):
        """A cache with the model's layer shapes, device and dtype."""
        model = check_model(model)
        p = next(model.parameters())
        return cls(model.cfg, n_blocks, block_size, device=p.device, dtype=p.dtype)

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of K and V for one block over all layers (to size `n_blocks` from memory)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * elem

    @property
    def n_blocks(self) -> int:
        return self.alloc.n_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # --- a sequence's blocks -------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Take the cached full blocks the tokens begin with (at least one token is left to
        compute: its logits are the next token's); returns how many tokens they cover."""
        if seq.blocks:
            raise RuntimeError("paged KV cache: match_prefix on a sequence that holds blocks")
        bs = self.block_size
        parent = b""
        for i in range((len(seq.tokens) - 1) // bs):
            h = block_hash(parent, seq.tokens[i * bs : (i + 1) * bs])
            block = self.alloc.lookup(h)
            if block is None:
                break
            seq.blocks.append(block)
            seq.hashes.append(h)
            parent = h
        seq.n_cached = len(seq.blocks) * bs
        return seq.n_cached

    def blocks_needed(self, seq: Sequence, n_tokens: int) -> int:
        """New blocks `seq` needs to store its next `n_tokens` tokens."""
        return max(0, self.blocks_for(seq.n_cached + n_tokens) - len(seq.blocks))

    def reserve(self, seq: Sequence, n_tokens: int) -> None:
        """Allocate the blocks for the next `n_tokens` tokens; all or nothing."""
        need = self.blocks_needed(seq, n_tokens)
        if need > self.alloc.available:
            raise OutOfBlocks(f"paged KV cache: {need} blocks needed, {self.alloc.available} free")
        seq.blocks.extend(self.alloc.allocate() for _ in range(need))
        self._note_peak()

    def release(self, seq: Sequence) -> None:
        """Give the sequence's blocks back (full named ones stay cached) and forget them:
        a preempted sequence is recomputed from its tokens. Last block first, so the LRU
        evicts a prefix's tail before its head (a chain is useless without its head)."""
        for block in reversed(seq.blocks):
            self.alloc.release(block)
        seq.blocks, seq.hashes, seq.n_cached = [], [], 0

    def fork(self, src: Sequence, dst: Sequence) -> bool:
        """Give `dst` (same tokens as `src`, no blocks yet) `src`'s cached prompt: its full
        blocks are shared, its partial last block is copied (both sequences write there
        next). False, with nothing changed, when no block is free for the copy."""
        if dst.blocks or dst.tokens[: src.n_cached] != src.tokens[: src.n_cached]:
            raise RuntimeError("paged KV cache: fork into a sequence that differs or holds blocks")
        bs = self.block_size
        full, rem = divmod(src.n_cached, bs)
        copy = None
        if rem:
            if not self.alloc.available:
                return False
            copy = self.alloc.allocate()
            at, to = src.blocks[full] * bs, copy * bs
            self.k[:, to : to + rem] = self.k[:, at : at + rem]
            self.v[:, to : to + rem] = self.v[:, at : at + rem]
        for block in src.blocks[:full]:
            self.alloc.share(block)
        dst.blocks = [*src.blocks[:full], *([copy] if copy is not None else [])]
        dst.hashes = list(src.hashes[:full])
        dst.n_cached = src.n_cached
        self._note_peak()
        return True

    def _commit(self, seq: Sequence, t: int) -> None:
        """`t` more tokens are stored: name the blocks that became full."""
        seq.n_cached += t
        bs = self.block_size
        for i in range(len(seq.hashes), seq.n_cached // bs):
            parent = seq.hashes[-1] if seq.hashes else b""
            h = block_hash(parent, seq.tokens[i * bs : (i + 1) * bs])
            self.alloc.register(seq.blocks[i], h)
            seq.hashes.append(h)

    def _note_peak(self) -> None:
        self.peak_used = max(self.peak_used, self.alloc.used)

    def _slots(self, seq: Sequence, positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(seq.blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    # --- views for one forward -----------------------------------------------------------

    def prefill_view(self, seq: Sequence, t: int) -> PagedView:
        """One sequence, its next `t` tokens at positions n_cached..: keys [1, kv, n+t, hd]."""
        start = seq.n_cached
        if seq.pending < t or self.blocks_needed(seq, t):
            raise RuntimeError("paged KV cache: prefill_view before reserve")
        self._check_writable(seq)
        slots = self._slots(seq, torch.arange(start + t))
        device = self.k.device
        return PagedView(
            self,
            [seq],
            t,
            write=slots[start:].to(device),
            gather=slots.to(device)[None],
            pos=start,
        )

    def decode_view(self, seqs: list[Sequence]) -> PagedView:
        """One new token per sequence, rows of different lengths (`batch_view` with t = 1)."""
        return self.batch_view(seqs, [1] * len(seqs))

    def batch_view(self, seqs: list[Sequence], ts: list[int]) -> PagedView:
        """`ts[r]` new tokens for each sequence, rows of different lengths, in one forward.

        Keys are gathered right-aligned into [B, kv, S, hd] (S = the longest row after
        this forward), the shorter rows padded on the left with the pad slot; the queries
        [B, T] (T = max ts) are right-aligned too, so each row's queries sit at the last
        slots of its keys and a key's slot distance is its real distance (causality, ALiBi,
        T5 biases and sliding windows stay right). `attention_mask` marks the real keys,
        `position_ids` give each query's position. A padding query writes its keys and
        values to the pad slot, never into a sequence's blocks: right-aligned, its slot
        would be a real cached token's."""
        for seq, t in zip(seqs, ts, strict=True):
            if t < 1 or seq.pending < t or self.blocks_needed(seq, t):
                raise RuntimeError("paged KV cache: batch_view before reserve")
            self._check_writable(seq)
        new = torch.tensor(ts, dtype=torch.long)
        cached = torch.tensor([s.n_cached for s in seqs], dtype=torch.long)
        lengths = cached + new
        s_max, t_max = int(lengths.max()), int(new.max())
        bs = self.block_size
        width = self.blocks_for(s_max)
        table = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, seq in enumerate(seqs):
            table[r, : len(seq.blocks)] = torch.tensor(seq.blocks[:width])
        # position of the key at each gathered slot; negative = left padding
        position = torch.arange(s_max)[None, :] - (s_max - lengths)[:, None]
        real = position >= 0
        position = position.clamp(min=0)
        slots = table.gather(1, position // bs) * bs + position % bs
        slots = torch.where(real, slots, torch.full_like(slots, self.pad_slot))
        query = torch.arange(t_max)[None, :] >= (t_max - new)[:, None]  # [B, T] real queries
        write = torch.where(
            query,
            slots[:, s_max - t_max :],
            torch.full_like(query, self.pad_slot, dtype=torch.long),
        )
        device = self.k.device
        padded = not bool(real.all())
        return PagedView(
            self,
            seqs,
            t_max,
            write=write.reshape(-1).to(device),
            gather=slots.to(device),
            pos=s_max - t_max,
            attention_mask=real.to(device) if padded else None,
            position_ids=(lengths[:, None] - t_max + torch.arange(t_max)[None, :])
            .clamp(min=0)
            .to(device),
            counts=ts,
        )

    def _check_writable(self, seq: Sequence) -> None:
        """The invariant that makes sharing safe: a write never lands in a shared block."""
        first = seq.n_cached // self.block_size
        for block in seq.blocks[first:]:
            if self.alloc.ref[block] != 1:
                raise RuntimeError(f"paged KV cache: block {block} is shared and would be written")


@dataclass
class PagedView:
    """The cache protocol for one forward over `seqs`, each with `t` new tokens."""

    cache: PagedKVCache
    seqs: list[Sequence]
    t: int
    write: torch.Tensor  # [B · t] slots the new keys/values go to
    gather: torch.Tensor  # [B, S] slots of the keys each row attends to
    pos: int
    attention_mask: torch.Tensor | None = None  # [B, S] real keys (None: no padding)
    position_ids: torch.Tensor | None = None  # [B, t] (None: pos.. for a single row)
    counts: list[int] | None = None  # new tokens per row when rows differ (else t each)

    @property
    def capacity(self) -> int:
        return self.gather.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        b, h, t, d = k.shape
        s = self.gather.shape[1]
        out = []
        for pool, new in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            pool.index_copy_(0, self.write, new.transpose(1, 2).reshape(b * t, h, d).to(pool))
            out.append(pool.index_select(0, self.gather.view(-1)).view(b, s, h, d).transpose(1, 2))
        return out[0], out[1]

    def advance(self, t: int) -> None:
        self.pos += t
        for seq, n in zip(self.seqs, self.counts or [t] * len(self.seqs), strict=True):
            self.cache._commit(seq, n)
