"""Elementwise kernels compiled into single loops, called without dynamo on the CPU.

`Fused(fn)` runs `fn` — a pure function of tensors and constants (the quantizers' forward and backward) — as
the loops inductor compiles from it. Through `torch.compile`, every call first passes dynamo's frame evaluation
and guards, and dynamo recompiles for each new kind of call up to its `recompile_limit`, after which it runs the
function eagerly — another arithmetic, said only in a log line (seen in one process that computed fourteen
fingerprints). So on the CPU each kind of call (below) is traced once with symbolic sizes (`make_fx`) and its graph
handed to inductor directly (`torch._inductor.standalone_compile`, with the same options; AOT-autograd's inference
wrapper stays); later calls of that kind go straight to the compiled module, with no limit on the kinds. A call
costs ~15 µs less; the W2A2 training step, within its spread, the same (`benchmarks/direct_kernels.py`,
results/bench/README.md).

The graph is the one dynamo captures and inductor compiles it the same way, with two differences. Dynamo makes the
integer arguments symbols and shares one graph among their values; this route compiles them in (a kind is at least
as fine as dynamo's guards). And inductor makes some choices from the sizes of the call it compiles — in these
kernels a cascade summation above 4,096 elements (its `need_use_acc_helper`), besides the loops' parallel depth —
which dynamo guards (a smaller call recompiles, and sums in another order) but a directly compiled module does not
check again. So this route serves only tensors of at least `DIRECT_MIN_NUMEL` (65,536) elements, the activations
the fused quantizers are called on (`ste.FUSE_MIN_NUMEL`), where both routes compile the same choices; smaller
calls go through dynamo. tests/test_compiled.py compares the two routes bit for bit on the package's fused
kernels, at the first call's sizes and at other ones served by the same module, and the arithmetic fingerprints
do not move (`benchmarks/fingerprint_matrix.py`).

A kind of call: each tensor's dtype and memory format, which sizes are equal (dynamo's duck sizing: one symbol for
equal sizes) and the constant arguments. Python floats (step-gradient scales) enter as 0-d float32 tensors, as
dynamo passes a float, so one module serves every layer's scale; that is the same arithmetic only where the float
meets float32 tensors alone, which the traced graph is checked for (otherwise the kind goes through dynamo). Calls
that fit none of this — a tensor off the CPU, one neither contiguous nor channels-last, a size of 0 or 1 (dynamo
specialises those), a tensor under `DIRECT_MIN_NUMEL` elements, inputs that need a gradient with grad mode on —
and a kind this torch cannot build directly (said in a warning) go through `torch.compile(dynamic=True)`; CUDA
always (its kernels were not compared).

Falls back to eager, once and with a warning, where compilation is unavailable (no C++ compiler, no triton, an
unsupported platform). Only compilation failures fall back: an error raised by a kernel that has run before (out
of memory, a device assert) propagates. VAQKD_COMPILE=0 turns compilation off.
"""

from __future__ import annotations

import os
import warnings

import torch


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "this could not be compiled" rather than "the kernel failed"."""
    errs: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errs.append(TorchDynamoException)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch._inductor.exc import InductorError

        errs.append(InductorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _known(options: dict | None) -> dict | None:
    """The inductor settings this torch has (an older one lacks some: its kernels then compile without them)."""
    if not options:
        return None
    from torch._inductor import config

    return {k: v for k, v in options.items() if hasattr(config, k)} or None


DIRECT_MIN_NUMEL = 1 << 16  # smaller tensors go through dynamo, whose guards choose their kernels by size


def _format(t: torch.Tensor) -> str | None:
    if t.is_contiguous():
        return "c"
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    return None


def call_kind(args: tuple) -> tuple | None:
    """The key of a call's compiled module (see the module's doc), or None where the call goes through dynamo."""
    grad = torch.is_grad_enabled()
    sizes: dict[int, int] = {}
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            fmt = _format(a)
            if (a.device.type != "cpu" or fmt is None or (grad and a.requires_grad) or any(n < 2 for n in a.shape)
                    or 0 < a.ndim and a.numel() < DIRECT_MIN_NUMEL):  # fmt: skip
                return None
            key.append(("t", a.dtype, fmt, tuple(sizes.setdefault(n, len(sizes)) for n in a.shape)))
        elif isinstance(a, float):
            key.append(("f",))
        elif a is None or isinstance(a, (bool, int, str)):
            key.append(("c", type(a).__name__, a))
        else:
            return None
    return tuple(key)


class _Direct:
    """One compiled module per kind of call, traced and compiled on first sight; other calls through dynamo."""

    def __init__(self, fn, options: dict | None):
        self.eager, self.options = fn, _known(options)
        self.modules: dict[tuple, tuple | None] = {}  # kind -> (one output?, module), None: through dynamo
        self.dynamo = None

    def __call__(self, *args):
        kind = call_kind(args)
        module = None if kind is None else self.modules.get(kind, False)
        if module is False:  # first sight of this kind
            module = self.modules[kind] = self._build(args)
        if module is None:
            if self.dynamo is None:
                self.dynamo = torch.compile(self.eager, dynamic=True, options=self.options)
            return self.dynamo(*args)
        one, compiled = module
        out = compiled(*_inputs(args))
        return out[0] if one else tuple(out)

    def _build(self, args: tuple):
        is_input = [isinstance(a, (torch.Tensor, float)) for a in args]
        single = []

        def graph(*tensors):
            it = iter(tensors)
            out = self.eager(*(next(it) if i else a for a, i in zip(args, is_input)))
            single.append(isinstance(out, torch.Tensor))
            return (out,) if single[-1] else tuple(out)

        inputs = _inputs(args)
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.no_grad():
                gm = make_fx(graph, tracing_mode="symbolic")(*inputs)
                floats = [i for i, a in enumerate(a for a in args if isinstance(a, (torch.Tensor, float)))
                          if isinstance(a, float)]  # fmt: skip
                if not _floats_meet_only_fp32(gm, floats):
                    return None  # as a 0-d tensor it could promote another dtype than a Python float does
                options = {"config_patches": self.options} if self.options else None  # torch.compile's `options`
                compiled = torch._inductor.standalone_compile(gm, inputs, dynamic_shapes="from_graph", options=options)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # this torch cannot build it directly: the same kernel through dynamo, said once
            warnings.warn(f"vaqkd: {getattr(self.eager, '__name__', 'kernel')} compiled through torch.compile "
                          f"({type(e).__name__} building it directly)", stacklevel=4)  # fmt: skip
            return None
        return single[0], compiled


def _inputs(args: tuple) -> list[torch.Tensor]:
    """A call's inputs to its compiled module: the tensors, and each float as a 0-d float32 tensor, in order."""
    return [torch.tensor(a, dtype=torch.float32) if isinstance(a, float) else a for a in args
            if isinstance(a, (torch.Tensor, float))]  # fmt: skip


def _floats_meet_only_fp32(gm: torch.fx.GraphModule, positions: list[int]) -> bool:
    """Whether every op that reads one of the graph's float inputs (its placeholders at `positions`) reads and
    makes float32 tensors only: there a 0-d float32 tensor computes what a Python float does."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in positions:
        for user in inputs[i].users:
            vals = [n.meta.get("val") for n in user.all_input_nodes] + [user.meta.get("val")]
            if any(not isinstance(v, torch.Tensor) or v.dtype != torch.float32 for v in vals):
                return False
    return True


class Fused:
    """`fn` compiled into single loops (the module's doc: directly on the CPU, through dynamo elsewhere), or eager
    where compilation is off or failed. `fn` is what runs: `self.fn` (None until the first call; then the
    compiled callable, or `self.eager`)."""

    def __init__(self, fn, options: dict | None = None):
        self.eager = fn
        self.options = options  # inductor settings for this kernel
        self.fn = None
        self.ran = False  # the compiled kernel has run at least once

    def __call__(self, *args):
        if self.fn is None:
            use = os.environ.get("VAQKD_COMPILE", "1") != "0" and hasattr(torch, "compile")
            self.fn = _Direct(self.eager, self.options) if use else self.eager
        try:
            out = self.fn(*args)
        except Exception as e:
            oom = isinstance(e, torch.OutOfMemoryError)
            if self.fn is self.eager or oom or (self.ran and not isinstance(e, compile_errors())):
                raise
            warnings.warn(
                f"vaqkd: torch.compile failed ({type(e).__name__}); using eager quantizer kernels", stacklevel=2
            )
            self.fn = self.eager
            return self.fn(*args)
        self.ran = True
        return out
