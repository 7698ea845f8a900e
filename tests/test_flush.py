"""`blockwise` (posenc_flush): denormals flushed only while an attention block computes, in its forward and in its
backward, and restored whatever ends the block (an exception, Ctrl-C inside a backward); the chunked bias path keeps
O(L) memory for the backward (blocks recomputed, dropout drawn alike)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from conftest import build, set_sigint_handling, sigint_handling
from test_bias_paths import Attention, causal
from test_contract import tokens

from hf_posenc.modeling import posenc_attention
from hf_posenc.modeling.posenc_attention import AlibiBias, T5RelativeBias, posenc_sdpa_attention
from hf_posenc.modeling.posenc_flush import DenormalFlush, blockwise, denormal_flush


@pytest.fixture(autouse=True)
def openmp_team():
    """An OpenMP team of at least 2 for every test here, also where the suite runs one thread per worker: the flush
    must reach the team's other threads, and the checks look at them."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def denormals_survive_everywhere() -> tuple[bool, bool]:
    """(some thread keeps denormals, some thread flushes them), from one multiply spread over the OpenMP team."""
    kept = (torch.full((1 << 20,), 1e-39) * 1.0) != 0
    return bool(kept.any()), bool((~kept).any())


def new_thread_flushes() -> bool:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(DenormalFlush.flushing()))
    thread.start()
    thread.join()
    return seen[0]


def assert_ieee_everywhere():
    """`1e-39 * 1.0` is 1e-39 on the calling thread, on every OpenMP worker and on a new thread."""
    assert not DenormalFlush.flushing(), "the calling thread still flushes denormals"
    assert denormals_survive_everywhere() == (True, False), "some OpenMP worker still flushes denormals"
    assert not new_thread_flushes(), "a new thread flushes denormals"


class Recorder(torch.autograd.Function):
    """Identity that records whether the calling thread flushes denormals, in forward and in backward."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        Recorder.seen.append(("forward", DenormalFlush.flushing()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        Recorder.seen.append(("backward", DenormalFlush.flushing()))
        return grad


@pytest.mark.parametrize("recompute", [False, True])
def test_denormals_flushed_for_the_call_and_its_backward_only(recompute):
    """Inside the call and inside its backward denormals are flushed; before and after, IEEE denormals are back."""
    assert_ieee_everywhere()
    Recorder.seen = []
    x = torch.randn(8, requires_grad=True)
    y = blockwise(Recorder.apply, x, recompute=recompute)
    assert_ieee_everywhere()
    y.sum().backward()
    expected = [("forward", True), ("forward", True), ("backward", True)] if recompute else None
    assert Recorder.seen == (expected or [("forward", True), ("backward", True)])
    assert torch.equal(x.grad, torch.ones(8))
    assert_ieee_everywhere()


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not denormal_flush._resolve(), reason="needs an OpenMP team")
def test_denormals_flushed_on_every_thread():
    """torch.set_flush_denormal reaches the calling thread only; the flush reaches every thread of the team."""
    with denormal_flush.on(torch.device("cpu")):
        assert denormals_survive_everywhere() == (False, True)
    assert denormals_survive_everywhere() == (True, False)


def test_denormal_flush_leaves_a_user_setting_alone(monkeypatch):
    """A process that already flushes keeps flushing; disabled, the flush is never touched."""
    torch.set_flush_denormal(True)
    try:
        with denormal_flush.on(torch.device("cpu")) as flushing:
            assert flushing.token is None
        assert DenormalFlush.flushing()
    finally:
        torch.set_flush_denormal(False)
    monkeypatch.setattr(DenormalFlush, "enabled", False)
    with denormal_flush.on(torch.device("cpu")):
        assert not DenormalFlush.flushing()


class Failure(Exception):
    pass


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_exception_inside_a_block_restores_denormals(recompute, where):
    """An error raised while a block computes (its forward; in its backward the recomputation or the gradients of the
    kept graph) leaves IEEE denormals on every thread, and the next block flushes again."""
    calls = []

    def fail(grad):
        calls.append(DenormalFlush.flushing())
        raise Failure

    def function(x):
        calls.append(DenormalFlush.flushing())
        if where == "forward" or (recompute and len(calls) > 1):
            raise Failure
        y = x * 2
        if y.requires_grad:  # the kept graph: its gradient fails inside the block's backward
            y.register_hook(fail)
        return y

    x = torch.randn(8, requires_grad=True)
    with pytest.raises(Failure):
        blockwise(function, x, recompute=recompute).sum().backward()
    assert calls == ([True] if where == "forward" else [True, True])
    assert_ieee_everywhere()
    Recorder.seen = []
    blockwise(Recorder.apply, torch.randn(2, requires_grad=True)).sum().backward()
    assert Recorder.seen == [("forward", True), ("backward", True)]
    assert_ieee_everywhere()


def test_ctrl_c_during_a_backward_restores_denormals(monkeypatch):
    """SIGINT at many moments of a training backward (a padded ALiBi and a T5 model on recomputed blocks, so many
    blocks, each recomputed with the flush on): whichever Python frame the KeyboardInterrupt surfaces in, no thread
    keeps flushing. Ctrl-C is made Python's default for the test: a process started in the background (`cmd &`,
    nohup) ignores SIGINT from its start, and the suite may run in one."""
    found = sigint_handling()
    set_sigint_handling(signal.default_int_handler, False)
    try:
        interrupted = interrupt_backwards(monkeypatch)
    finally:
        set_sigint_handling(*found)
    assert interrupted >= 12


def interrupt_backwards(monkeypatch) -> int:
    """Training backwards that a SIGINT is sent into at 12 moments each, on ALiBi and T5: how many were interrupted."""
    monkeypatch.setattr(posenc_attention, "BIAS_BLOCK_BYTES", 4 * 4 * 64 * 8)  # 8 query rows a block: many blocks
    monkeypatch.setattr(posenc_attention.ScoreBiasMask, "key_padding", lambda self: None)  # blocks, not the column
    x = tokens(2, 64)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    interrupted = 0
    for scheme in ("alibi", "t5_bias"):
        model = build("llama", scheme).train()
        began = time.perf_counter()
        model(x, attention_mask=mask, labels=x).loss.backward()
        duration = time.perf_counter() - began
        for step in range(12):
            timer = threading.Timer(duration * (0.05 + 0.1 * step), os.kill, (os.getpid(), signal.SIGINT))
            try:
                try:
                    loss = model(x, attention_mask=mask, labels=x).loss
                    timer.start()
                    loss.backward()
                    time.sleep(duration * 2)  # the signal may come after the backward: take it here
                finally:
                    timer.cancel()
                    if timer.is_alive():
                        timer.join()
                    time.sleep(0.01)  # a signal sent just now is taken inside this try
            except KeyboardInterrupt:
                interrupted += 1
            assert_ieee_everywhere()
    return interrupted


def saved_bytes(function) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `function` runs."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


@pytest.mark.parametrize("provider", [AlibiBias(4), T5RelativeBias(4)], ids=["alibi", "t5_bias"])
def test_chunked_training_keeps_linear_memory(monkeypatch, provider):
    """With a padding mask the chunked path keeps its inputs for the backward, not one (H, chunk, K) bias and mask
    per block: saved bytes grow linearly with the length (the O(L^2) mask transformers builds is not counted)."""
    monkeypatch.setattr(posenc_attention, "BIAS_BLOCK_BYTES", 4 * 4 * 1024 * 16)  # 16 query rows a block
    saved = {}
    for length in (256, 1024):
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, length, 16, generator=generator, requires_grad=True) for _ in range(3))
        allowed = torch.ones(1, 1, length, length, dtype=torch.bool).tril()
        allowed[..., 0] = False  # one padding key
        masks = causal(length, length, allowed)

        def step(q=q, k=k, v=v, masks=masks):
            posenc_sdpa_attention(Attention(provider), q, k, v, masks, scaling=0.25)

        saved[length] = saved_bytes(step) - allowed.numel()
    inputs = 3 * 4 * 16 * 4  # q, k, v bytes per position
    assert saved[1024] <= 2 * inputs * 1024 + 4 * 32 * 4, saved
    assert saved[1024] / saved[256] < 4.5, saved  # linear, not quadratic (16x)


def test_recomputed_blocks_draw_the_same_dropout(monkeypatch):
    """A recomputed block draws its dropout mask from the random state of its forward: the gradients equal those of
    the blocks kept whole."""
    monkeypatch.setattr(posenc_attention, "BIAS_BLOCK_BYTES", 4 * 4 * 32 * 8)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 4, 32, 16, generator=generator) for _ in range(3)]
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril()
    mask[..., 0] = False
    results = []
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(
                posenc_attention, "blockwise", lambda f, *t, recompute=False, random=False: blockwise(f, *t)
            )
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        provider = T5RelativeBias(4)
        torch.manual_seed(0)
        provider.relative_attention_bias.weight.data.normal_()
        torch.manual_seed(1)
        out, _ = posenc_sdpa_attention(Attention(provider), q, k, v, causal(32, 32, mask), 0.5, 0.25)
        torch.manual_seed(2)  # the backward must not depend on the random state at its time
        out.square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad, provider.relative_attention_bias.weight.grad])
    for recomputed, kept in zip(*results):
        torch.testing.assert_close(recomputed, kept, rtol=1e-6, atol=1e-6)
    assert results[0][0].ne(results[0][0].detach() * 0).any()


@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_padded_training_matches_eager(scheme):
    """Recomputed blocks give the gradients of the eager reference (a padded batch, every parameter; the padding
    rows, which attend nothing, left out of the loss)."""
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    labels = x.masked_fill(mask == 0, -100)
    labels[0, 4] = -100  # predicted from the last padding row
    grads = []
    for implementation in ("posenc_sdpa", "posenc_eager"):
        model = build("llama", scheme, attn_implementation=implementation).train()
        model(x, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_kept_graph_is_freed_by_the_backward():
    """A block kept whole (the column trick's mode) holds its inner graph among the node's saved tensors: freed by
    the backward even while the output is still referenced (the training loop's `loss`)."""
    import gc
    import weakref

    inner = []

    def function(x):
        out = x.exp()
        inner.append(weakref.ref(out))
        return out * 2

    x = torch.randn(8, requires_grad=True)
    y = blockwise(function, x)
    y.sum().backward()
    gc.collect()
    assert inner[0]() is None, "the inner graph outlived the backward"
    assert y.grad_fn is not None


def test_recomputation_runs_under_the_forward_autocast(monkeypatch):
    """Under CPU bf16 autocast (a padded T5 model), a recomputed block differentiates the function its forward
    computed (the recompute runs under the same autocast): the gradients equal those of blocks kept whole up to bf16
    rounding (recomputed in fp32 they were 6% off)."""
    x = tokens(2, 24)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    grads = []
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(
                posenc_attention, "blockwise", lambda f, *t, recompute=False, random=False: blockwise(f, *t)
            )
        model = build("llama", "t5_bias", attn_implementation="posenc_sdpa").train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, attention_mask=mask, labels=x).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-2
