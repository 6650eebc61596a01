"""Linear layers over a few rows (every decode step) on CPU in float32 by oneDNN instead of MKL.

A decode step multiplies every weight of the LLM by one row per running request. On CPU, ``F.linear``
hands that product to MKL, whose float32 kernels for few rows are far from what this project's 2-core
AMD EPYC machines do. One pass over the bench preset LLM's linear layers (1.6 GB of weights, read from
memory), by rows, in one run:

    rows                     1      4     16
    F.linear (MKL)   ms     88    234    230
    oneDNN           ms     60     90    141

oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own compiler emits for
linear layers on CPU) decodes one request 1.5x faster, and four rows cost 1.5x one row instead of 2.7x,
which is what batched decoding needs.

More rows (a prefill, the vision tower) keep ``F.linear``: oneDNN was faster there too in isolated
products, but on the Qwen2.5-VL bench a 343-token prefill took the same time with either kernel while a
1240-token one was 1.2x faster with oneDNN, so the evidence for prefill is mixed. GPUs and half
precision keep ``F.linear`` (cuBLAS picks its own kernel; the measurement is float32 on CPU), and so does
anything that records gradients. Only the order of the float sums changes (a few 1e-6 in float32): the
engine's answers equal stock ``generate``'s on the same model, which runs the same layers.
"""

from __future__ import annotations

import types

import torch

__all__ = ["MAX_FEW_ROWS", "cpu_linear", "route_cpu_linears"]

# Up to this many rows (decode steps, short follow-up questions) the product goes to oneDNN.
MAX_FEW_ROWS = 16


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN for float32 CPU tensors of 1..MAX_FEW_ROWS rows outside
    autograd.

    Args:
        x: [..., in_features].
        weight: [out_features, in_features].
        bias: [out_features] or None.
    Returns:
        [..., out_features].
    """
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (0 < rows <= MAX_FEW_ROWS and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return cpu_linear(x, self.weight, self.bias)


def route_cpu_linears(model: torch.nn.Module) -> int:
    """Compute every ``nn.Linear`` of `model` whose weight is float32 on CPU with ``cpu_linear`` (few rows
    by oneDNN, more by ``F.linear``).

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
