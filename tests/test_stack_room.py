"""`call_with_stack_room`: a frame that calls many small functions never maps a fresh
CPython frame-stack chunk per call, wherever the caller's stack ends; and every decode
loop (the sampling loop, eager and compiled, and the continuous-batching scheduler) runs
its model forwards from it."""

from __future__ import annotations

import resource
import sys

import torch

from lmlab.infer.generate import generate_batch
from lmlab.infer.options import GenerationConfig
from lmlab.infer.scheduler import Scheduler
from lmlab.utils import call_with_stack_room

from .test_paged import tiny_model


def _wide_frame_caller(n_locals: int):
    """A function with a frame as wide as a compiled graph's wrapper (one local per
    buffer), calling a small Python function many times, as the wrapper calls operators."""
    src = "def wide(op):\n" + "".join(f"    b{i} = None\n" for i in range(n_locals))
    src += "    for _ in range(300):\n        op()\n"
    space: dict = {}
    exec(src, space)  # noqa: S102 - test-only code generation
    return space["wide"]


def _max_faults(call, wides: list) -> int:
    """The most minor page faults one `call(wide)` takes, over caller stack depths and
    wide-frame sizes that together put the wide frame at every 8-byte offset of a
    frame-stack chunk."""

    def at(d: int, wide) -> int:
        if d:
            return at(d - 1, wide)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        call(wide)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    call(wides[0])  # warm
    return max(at(d, w) for d in range(0, 160, 4) for w in wides)


def test_stack_room_keeps_calls_off_fresh_frame_chunks():
    """From `call_with_stack_room`, a wide frame's 300 calls fault in no fresh chunk at
    any offset; called plainly, CPython 3.11 maps, faults in and unmaps a chunk per call
    at some offsets (the slowdown guarded against)."""
    wides = [_wide_frame_caller(1400 + k) for k in range(64)]

    def op() -> None:
        return None

    assert _max_faults(lambda w: call_with_stack_room(w, op), wides) < 100
    if sys.version_info[:2] == (3, 11):  # the chunk policy this guards against
        assert _max_faults(lambda w: w(op), wides) >= 300


def test_stack_room_passes_arguments_and_results():
    assert call_with_stack_room(lambda a, b=0: (a, b), 1, b=2) == (1, 2)
    assert call_with_stack_room.__code__.co_stacksize >= 8192


def _record_forwards(model: torch.nn.Module) -> list[bool]:
    """For each forward of `model`, whether it was called from `call_with_stack_room`."""
    seen: list[bool] = []

    def hook(module, args):
        frame, found = sys._getframe(), False
        while frame is not None and not found:
            found = frame.f_code is call_with_stack_room.__code__
            frame = frame.f_back
        seen.append(found)

    model.register_forward_pre_hook(hook)
    return seen


def test_decode_loops_run_forwards_with_stack_room():
    model = tiny_model().eval()
    seen = _record_forwards(model)
    generate_batch(model, [[5, 6, 7], [8, 9]], GenerationConfig(max_new_tokens=4))
    sched = Scheduler(model, block_size=4, max_batch=4)
    sched.run([[5, 6, 7], [8, 9, 10, 11]], GenerationConfig(max_new_tokens=4))
    assert len(seen) >= 8 and all(seen)
