"""Tracing a model for the ONNX export: torch.fx down to the layers the exporter maps, each node knowing the module
path it came from (so an unsupported one is named), and which quantizers read a node's output."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from vaqkd.deploy.artifact import ExportError


class Tracer(fx.Tracer):
    """Traces down to the layers the exporter maps (convs, linears, BatchNorm, quantizers, ReLU, pools) and records
    the output node of every other module by its path (`build_onnx(..., stop_after=...)`)."""

    LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
              nn.Dropout)  # fmt: skip

    def __init__(self):
        super().__init__()
        self.outputs: dict[str, fx.Node] = {}
        self._where: list[tuple[str, str]] = [("", "the model")]  # (module path, type) being traced

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = self._where[-1]
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from vaqkd.quant import Quantizer

        return isinstance(m, (*self.LEAVES, Quantizer)) or (type(m) is nn.Sequential and not len(m))

    def call_module(self, m, forward, args, kwargs):
        self._where.append((self.path_of_module(m), type(m).__name__))
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._where.pop()
        if not self.is_leaf_module(m, "") and isinstance(out, fx.Proxy):
            self.outputs[self.path_of_module(m)] = out.node
        return out


def trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """The model's fx graph at the level of its layers (a copy of the model with the float residual stages'
    fused fast path taken out: the plain blocks compute the same numbers)."""
    from vaqkd.quant import remove_fusions

    model = copy.deepcopy(model).eval()
    remove_fusions(model)
    for m in model.modules():  # the caller's hooks must not see the tracer's proxies
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    tracer = Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # a forward with data-dependent control flow or an untraceable call
        raise ExportError(f"{type(model).__name__}: cannot be traced for export ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None  # fmt: skip
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    return gm, tracer.outputs


def is_relu(n: fx.Node, modules) -> bool:
    return ((n.op == "call_function" and n.target in (F.relu, torch.relu)) or (n.op == "call_method" and
            n.target == "relu") or (n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)))  # fmt: skip


def consumer_quants(n: fx.Node, modules) -> list:
    """The activation quantizers that read node n's output (through ReLUs, which an unsigned quantizer absorbs);
    None for any other reader."""
    from vaqkd.quant import QConv2d, QLinear, Quantizer

    out = []
    for u in n.users:
        m = modules.get(u.target) if u.op == "call_module" else None
        if is_relu(u, modules):
            qs = consumer_quants(u, modules)
            out += [q if q is not None and q.clamps_at_zero else None for q in qs] or [None]
        elif isinstance(m, Quantizer):
            out.append(m)
        elif isinstance(m, (QConv2d, QLinear)):
            out.append(m.a_quant)
        else:
            out.append(None)
    return out
