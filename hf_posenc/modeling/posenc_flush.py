"""Attention blocks that flush denormals and keep no intermediate for the backward: `blockwise`.

Part of the `trust_remote_code` closure: imports only torch.

A bias that falls with distance drives many softmax weights `exp(score - max)` into the fp32 denormal range (below
1.2e-38), where x86 arithmetic slows down by orders of magnitude: causal ALiBi on SDPA ran 2.6x slower for that alone.
Flushing those weights to zero changes the output by less than 1e-38 relative to a row's sum, i.e. not at all in
fp32. The flush is on only while a block computes, in its forward and in its backward, each inside one Python frame
that restores the floating-point environment on the way out, whatever leaves it (an exception, Ctrl-C, out of memory).

A block of the chunked bias path keeps nothing for the backward but its inputs (views of q, k, v) and recomputes its
scores there, so training memory stays O(L): autograd would otherwise keep every block's (B, H, chunk, K) bias and
mask until the backward, O(L^2) in all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from pathlib import Path

import torch


class DenormalFlush:
    """Flush denormal floats to zero on every CPU thread inside `with denormal_flush.on(device):`, then restore.

    `torch.set_flush_denormal` sets the calling thread only, and the OpenMP workers that run a kernel keep their own
    state; with libgomp (PyTorch's Linux builds) every thread of the team gets the flushing floating-point environment
    through one `GOMP_parallel` call of `fesetenv`, and gets its own back the same way. Elsewhere only the calling
    thread is set. Nothing happens for a device that is not the CPU, when the calling thread flushes already (a user's
    own `torch.set_flush_denormal(True)` is theirs to undo), or when `DenormalFlush.enabled` is False.
    """

    enabled = True

    def __init__(self):
        self._team = None  # (GOMP_parallel, fesetenv, fegetenv) or () when unavailable; resolved on first use

    def _resolve(self):
        if self._team is None:
            self._team = ()
            try:
                if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
                    with open("/proc/self/maps") as maps:
                        paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
                    # torch's own runtime first: torch.compile'd kernels may load the system's libgomp beside it
                    torch_lib = str(Path(torch.__file__).parent)
                    path = min(paths, key=lambda candidate: not candidate.startswith(torch_lib))
                    gomp, libm = ctypes.CDLL(path), ctypes.CDLL(ctypes.util.find_library("m"))
                    gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    gomp.GOMP_parallel.restype = None
                    libm.fegetenv.argtypes = [ctypes.c_void_p]
                    self._team = (gomp.GOMP_parallel, ctypes.cast(libm.fesetenv, ctypes.c_void_p), libm.fegetenv)
            except (OSError, ValueError, AttributeError, TypeError):  # no libgomp or libm: the calling thread only
                self._team = ()
        return self._team

    @staticmethod
    def flushing() -> bool:
        """Whether the calling thread flushes denormals (a denormal operand reads as zero)."""
        return (torch.full((), 1e-39) * 1.0).item() == 0.0

    def _set_team(self, environment) -> None:
        parallel, fesetenv, _ = self._team
        parallel(fesetenv, environment, torch.get_num_threads(), 0)

    def enter(self, device: torch.device):
        """Start flushing on every thread; returns the token `exit` needs (None when nothing was changed). Prefer
        `on(device)`, which cannot leave the flush on."""
        if not self.enabled or torch.device(device).type != "cpu" or self.flushing():
            return None
        team = self._resolve()
        if not team:
            torch.set_flush_denormal(True)
            return "thread"
        before, after = ctypes.create_string_buffer(256), ctypes.create_string_buffer(256)  # >= sizeof(fenv_t)
        team[2](before)
        try:
            torch.set_flush_denormal(True)
            team[2](after)
            self._set_team(after)
        except BaseException:  # an interrupt between two of the calls: leave nothing behind
            self.exit(before)
            raise
        return before

    def exit(self, token) -> None:
        if token is None:
            return
        if isinstance(token, str):
            torch.set_flush_denormal(False)
        else:
            self._set_team(token)

    def on(self, device: torch.device) -> _Flushing:
        """A context manager: denormals flushed on every thread inside, the previous environment back on leaving."""
        return _Flushing(self, device)


class _Flushing:
    def __init__(self, flush: DenormalFlush, device):
        self.flush, self.device, self.token = flush, device, None

    def __enter__(self):
        self.token = self.flush.enter(self.device)
        return self

    def __exit__(self, *exc):
        token, self.token = self.token, None
        self.flush.exit(token)
        return False


denormal_flush = DenormalFlush()


class _RNGState:
    """The random state a block's dropout drew from, to draw the same mask again when the block is recomputed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self):
        """Draw from the saved state inside; the random state from before comes back on leaving."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None:
                torch.cuda.set_rng_state(self.accelerator, self.device)
            yield


class _Block(torch.autograd.Function):
    """`function(*tensors)` as one autograd node: computed with denormals flushed, and differentiated (also with
    denormals flushed) either by recomputing it from its inputs (`recompute`: nothing else is kept) or through the
    graph of its forward, kept among the node's saved tensors. The recomputation runs under the autocast state of the
    forward."""

    @staticmethod
    def forward(ctx, function, recompute, random, *tensors):
        ctx.function, ctx.recompute = function, recompute
        device = tensors[0].device
        if recompute:
            ctx.rng = _RNGState(device) if random else None
            kind = device.type
            ctx.autocast = dict(
                device_type=kind,
                enabled=torch.is_autocast_enabled(kind),
                dtype=torch.get_autocast_dtype(kind),
                cache_enabled=torch.is_autocast_cache_enabled(),
            )
            ctx.save_for_backward(*tensors)
            with denormal_flush.on(device):
                return function(*tensors)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            with denormal_flush.on(device):
                output = function(*leaves)
        # saved as this node's own tensors (the inner output keeps its graph): autograd frees them with the node's
        # other saved tensors after a backward, and gradient checkpointing's hooks see them
        ctx.save_for_backward(output, *leaves)
        return output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.recompute:
            tensors = ctx.saved_tensors
            leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, ctx.needs_input_grad[3:])]
            random = ctx.rng.restored() if ctx.rng is not None else contextlib.nullcontext()
            autocast = torch.autocast(**ctx.autocast)  # the forward's: the same function is differentiated
            with random, autocast, torch.enable_grad(), denormal_flush.on(tensors[0].device):
                output = ctx.function(*leaves)
            retain = False
        else:
            output, *leaves = ctx.saved_tensors
            retain = True  # freed with this node's saved tensors: a backward with retain_graph=True may come again
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        with denormal_flush.on(grad_output.device):
            grads = iter(torch.autograd.grad(output, wanted, grad_output, retain_graph=retain, allow_unused=True))
        return (None, None, None, *(next(grads) if leaf.requires_grad else None for leaf in leaves))


def blockwise(function, *tensors, recompute: bool = False, random: bool = False) -> torch.Tensor:
    """`function(*tensors)` with denormals flushed in its forward and its backward (on the CPU), as one autograd node.

    `function` must reach every tensor that needs a gradient (parameters too) through its arguments and return one
    tensor. `recompute`: keep only the inputs and recompute in the backward (O(inputs) memory); `random`: the function
    draws random numbers (dropout), which the recomputation draws again alike. Without autograd, or under
    torch.compile, it is the plain call with the flush around it (none when compiling).
    """
    if torch.compiler.is_compiling():
        return function(*tensors)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        with denormal_flush.on(tensors[0].device):
            return function(*tensors)
    return _Block.apply(function, recompute, random, *tensors)
