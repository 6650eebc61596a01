"""Linear layers on CPU in float32 by oneDNN instead of MKL.

On CPU, ``F.linear`` hands the product to MKL. On this project's 2-core AMD EPYC machines MKL's float32
kernels are far from what the hardware does, and worst for the few rows of a decode step. One pass over
the bench preset LLM's linear layers (1.6 GB of weights), by rows, in one run:

    rows                     1      4     16     64    110    440
    F.linear (MKL)   ms     88    234    230    506    847   2600
    oneDNN           ms     60     90    141    366    484   1774

oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own compiler emits for
linear layers on CPU) is faster at every size: decode steps are bound by reading the weights again, four
rows cost 1.5x one row instead of 2.7x (what batched decoding needs), and prefill is 1.5x faster.

GPUs and half precision keep ``F.linear`` (cuBLAS picks its own kernel; the measurement is float32 on
CPU), and so does anything that records gradients. Only the order of the float sums changes (a few 1e-6
in float32): the engine's answers equal stock ``generate``'s on the same model, which runs the same
layers.
"""

from __future__ import annotations

import types

import torch

__all__ = ["cpu_linear", "route_cpu_linears"]


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN for float32 CPU tensors outside autograd.

    Args:
        x: [..., in_features].
        weight: [out_features, in_features].
        bias: [out_features] or None.
    Returns:
        [..., out_features].
    """
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and x.numel()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return cpu_linear(x, self.weight, self.bias)


def route_cpu_linears(model: torch.nn.Module) -> int:
    """Compute every ``nn.Linear`` of `model` whose weight is float32 on CPU with ``cpu_linear``.

    Returns how many layers were routed: 0 on a GPU, in half precision, or in a torch built without
    oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    routed = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.float32):
            module.forward = types.MethodType(_forward, module)
            routed += 1
    return routed
