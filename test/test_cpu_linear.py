"""cpu_linear: oneDNN for float32 CPU tensors outside autograd, F.linear for everything else; the engine
routes every linear layer of its family's modules through it on CPU in float32 only."""
import numpy as np
import pytest
import torch

from zip_vlm_ros.engine import EngineConfig, VlmEngine
from zip_vlm_ros.engine.cpu_linear import MAX_FEW_ROWS, _forward, cpu_linear, route_cpu_linears


def weights(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    return weight, bias


@pytest.mark.parametrize("rows", [1, 4, MAX_FEW_ROWS, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_f_linear_up_to_the_order_of_sums(rows, with_bias):
    weight, bias = weights()
    bias = bias if with_bias else None
    x = torch.randn(rows, 1, 64)                       # [rows, 1 token, in]: a decode step's shape
    out = cpu_linear(x, weight, bias)
    assert out.shape == (rows, 1, 96)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    # a strided view (the last position of longer sequences)
    longer = torch.randn(rows, 5, 64)
    torch.testing.assert_close(cpu_linear(longer[:, -1:], weight, bias),
                               torch.nn.functional.linear(longer[:, -1:], weight, bias), rtol=1e-5, atol=1e-5)


def test_the_kernel_is_onednn_for_few_float32_rows_and_f_linear_otherwise():
    weight, bias = weights()
    with torch.profiler.profile() as profile:
        cpu_linear(torch.randn(4, 64), weight, bias)
    assert "mkldnn::_linear_pointwise" in {event.key for event in profile.key_averages()}
    many = torch.randn(MAX_FEW_ROWS + 1, 64)
    assert torch.equal(cpu_linear(many, weight, bias), torch.nn.functional.linear(many, weight, bias))
    half_weight, half_bias = weights(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(cpu_linear(x, half_weight, half_bias), torch.nn.functional.linear(x, half_weight, half_bias))
    empty = torch.randn(0, 64)
    assert cpu_linear(empty, weight, bias).shape == (0, 96)


def test_autograd_keeps_f_linear_and_its_gradients():
    weight, bias = weights()
    x = torch.randn(2, 64)
    grads = []
    for linear in (cpu_linear, torch.nn.functional.linear):
        leaf = weight.clone().requires_grad_(True)
        linear(x, leaf, bias).square().sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_routes_float32_cpu_linears_only():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert route_cpu_linears(model) == 2
    assert all(layer.forward.__func__ is _forward for layer in (model[0], model[2]))
    assert route_cpu_linears(torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16))) == 0


@pytest.mark.parametrize("dtype,routed", [("float32", True), ("bfloat16", False)])
def test_the_engine_routes_its_model_on_cpu_in_float32(tiny_model_dir, dtype, routed):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype=dtype))
    try:
        layers = [module for module in engine.model.modules() if type(module) is torch.nn.Linear]
        assert layers and all((getattr(layer.forward, "__func__", None) is _forward) == routed for layer in layers)
        assert engine.generate(np.zeros((56, 56, 3), dtype=np.uint8), "What is this?",
                               max_new_tokens=2).generated_tokens >= 1
    finally:
        engine.close()


def test_llava_mini_routes_its_tower_and_prefusion_layers_too(tiny_mini_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_mini_model_dir), device="cpu"))
    try:
        family = engine.family
        for module in (family.model, family.vision_tower, family.projector, family.prefusion):
            layers = [layer for layer in module.modules() if type(layer) is torch.nn.Linear]
            assert layers and all(layer.forward.__func__ is _forward for layer in layers), type(module).__name__
        assert engine.family.torch_modules()[-2:] == [family.compressor, family.prefusion]  # no nn.Linear in it
    finally:
        engine.close()
