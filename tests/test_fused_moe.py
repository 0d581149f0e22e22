"""The fused Triton MoE experts ("llada_fused") against an independent per-token, per-slot eager reference.

Without CUDA the kernels run in Triton's interpreter on CPU (float32/float16 only: bf16 arithmetic is broken in the
interpreter); with CUDA the same cases run the compiled kernels and the `gpu` tests add bf16.
"""

import importlib
import os
import subprocess
import sys

import bitsandbytes as bnb  # the dev extra installs it (and triton): a broken install fails here instead of skipping
import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401 (only to fail at once without it; the kernels need it)
from bnb_reference import reference_dequantize_4bit
from conftest import tiny_model
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward


# Without CUDA, Triton's interpreter runs the kernels; it has to be on when the kernels are decorated (the first
# import of fused_moe, below). With CUDA the compiled kernels run (the interpreter cannot do bf16). The kernels use
# only builtin `tl` ops, so it does not matter that triton was imported before this line.
SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

from modeling_llada_moe import fused_moe as fm  # noqa: E402 (after TRITON_INTERPRET)


if SET_INTERPRET:
    if not fm._interpreting():  # imported earlier in this session without the interpreter: decorate again
        fm = importlib.reload(fm)
    del os.environ["TRITON_INTERPRET"]  # the kernels are decorated; later test modules get the environment they had


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
E, H, I = 8, 64, 32  # noqa: E741 (the experts' intermediate width)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max abs error / max |expected|
# Small tiles: several K steps, several M-blocks per expert, partial N tiles.
SMALL = fm.MoEConfig(16, fm.GemmConfig(16, 16, group_m=2), fm.GemmConfig(16, 32, group_m=1))


def reference_moe(x, top_k_index, top_k_weights, gate_up, down):
    """Per token and slot, in float64: w * W_down_e (silu(W_gate_e x) * (W_up_e x)) summed over slots."""
    x, gate_up, down = x.double().cpu(), gate_up.double().cpu(), down.double().cpu()
    index, weights = top_k_index.cpu(), top_k_weights.double().cpu()
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[token, slot])
            if not 0 <= e < E:
                continue  # expert-parallel sentinel: no contribution
            w_gate = gate_up[e * 2 * I : e * 2 * I + I]
            w_up = gate_up[e * 2 * I + I : (e + 1) * 2 * I]
            w_down = down[e * H : (e + 1) * H]
            h = F.silu(w_gate @ x[token]) * (w_up @ x[token])
            out[token] += weights[token, slot] * (w_down @ h)
    return out


def random_weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E * 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E * H, I, generator=g) / I**0.5
    return gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def routing(case: str, tokens: int, top_k: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    if case == "random":
        index = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    elif case == "one_expert":
        index = torch.full((tokens, top_k), 3)
    elif case == "empty_experts":  # only experts 1, 5 and 6 get tokens
        index = torch.tensor([1, 5, 6])[torch.randint(0, 3, (tokens, top_k), generator=g)]
    elif case == "dropped":  # expert-parallel sentinels (-1, E) mixed in
        index = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
        index[::3, 0] = E
        index[1::4, -1] = -1
    else:
        raise ValueError(case)
    weights = torch.rand(tokens, top_k, generator=g)
    return index.to(DEVICE), weights


def check(out, expected, dtype):
    scale = expected.abs().max().item()
    error = (out.double().cpu() - expected).abs().max().item()
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert scale > 0 and error <= TOL[dtype] * scale, f"max abs error {error:.3g} (output max {scale:.3g})"
    return error / scale


@pytest.mark.parametrize("drop_invalid", [False, True])
def test_align_groups_slots_by_expert_with_padding(drop_invalid):
    index = torch.tensor([[1, 5], [5, 2], [1, 5], [7, 1], [3, 2]])  # experts 0, 4, 6 empty
    if drop_invalid:
        index[4, 0] = E  # an expert-parallel sentinel instead of expert 3
    slots, block_expert, num_blocks = fm._align(index, E, block_m=4, drop_invalid=drop_invalid)
    flat, num_slots = index.reshape(-1), index.numel()
    assert slots.shape == (num_blocks * 4,) and block_expert.shape == (num_blocks,)
    real = slots[slots < num_slots]
    assert sorted(real.tolist()) == [s for s in range(num_slots) if flat[s] < E]  # every routed slot exactly once
    for block, expert in enumerate(block_expert.tolist()):
        members = slots[block * 4 : (block + 1) * 4]
        members = members[members < num_slots]
        if expert < 0:
            assert members.numel() == 0
        else:
            assert members.numel() > 0 and (flat[members.long()] == expert).all()
            assert members.tolist() == sorted(members.tolist())  # stable: slot order kept inside an expert
    # experts 1 (3 slots), 2 (2), 5 (3), 7 (1) and, unless dropped, 3 (1): one 4-row block each
    assert (block_expert >= 0).sum().item() == (4 if drop_invalid else 5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("case", "tokens", "top_k", "config"),
    [
        ("random", 37, 2, None),
        ("random", 37, 2, SMALL),
        ("one_expert", 21, 2, SMALL),
        ("empty_experts", 19, 2, None),
        ("random", 29, 1, None),
        ("random", 11, E, SMALL),
        ("random", 1, 2, None),
        ("random", 1, E, None),
        ("dropped", 13, 3, None),
    ],
)
def test_dense_matches_reference(dtype, case, tokens, top_k, config):
    gate_up, down = random_weights(dtype)
    index, weights = routing(case, tokens, top_k)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    weights = weights.to(DEVICE, dtype)
    out = fm.fused_moe(x, index, weights, gate_up, down, E, I, config=config, expert_parallel=case == "dropped")
    check(out, reference_moe(x, index, weights, gate_up, down), dtype)


@torch.no_grad()
def test_chunked_long_input_matches_unchunked(monkeypatch):
    gate_up, down = random_weights(torch.float32)
    index, weights = routing("random", 40, 2)
    x = torch.randn(40, H).to(DEVICE)
    whole = fm.fused_moe(x, index, weights.to(DEVICE), gate_up, down, E, I)
    monkeypatch.setattr(fm, "MAX_SLOTS_PER_CHUNK", 30)  # 15 tokens per chunk: 3 chunks
    chunked = fm.fused_moe(x, index, weights.to(DEVICE), gate_up, down, E, I)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert fm.fused_moe(x[:0], index[:0], weights[:0].to(DEVICE), gate_up, down, E, I).shape == (0, H)


def quantize_container(weight: torch.Tensor, compress_statistics: bool, quant_type: str = "nf4"):
    """A `Linear4bit` holding `weight` [out, in] the way a bnb-quantized model does, and its dequantized weight."""
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=compress_statistics
    )
    out_features, in_features = weight.shape
    linear = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=weight.dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        device=weight.device,
    )
    linear.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=64,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        bnb_quantized=True,
        module=linear,
    )
    return linear, reference_dequantize_4bit(linear.weight).to(weight.dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default_tiles", "small_tiles"])
def test_nf4_matches_dequantized_reference(dtype, compress_statistics, config):
    gate_up, down = random_weights(dtype, seed=2)
    # gate_up rows are H = 64 wide (one absmax per row and K tile); down rows are I = 32 wide, so a 64-value
    # quantization block spans two rows: both in-kernel scale paths run.
    gate_up_q, gate_up_dq = quantize_container(gate_up, compress_statistics)
    down_q, down_dq = quantize_container(down, compress_statistics)
    assert gate_up_q.weight.dtype == torch.uint8 and gate_up_q.weight.quant_state.nested == compress_statistics
    index, weights = routing("random", 23, 3)
    x = torch.randn(23, H, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    weights = weights.to(DEVICE, dtype)
    out = fm.fused_moe(x, index, weights, gate_up_q.weight, down_q.weight, E, I, config=config)
    check(out, reference_moe(x, index, weights, gate_up_dq, down_dq), dtype)


@torch.no_grad()
def test_fp4_codebook_also_works():
    gate_up, down = random_weights(torch.float32, seed=3)
    gate_up_q, gate_up_dq = quantize_container(gate_up, False, "fp4")
    down_q, down_dq = quantize_container(down, True, "fp4")
    index, weights = routing("random", 9, 2)
    x = torch.randn(9, H).to(DEVICE)
    out = fm.fused_moe(x, index, weights.to(DEVICE), gate_up_q.weight, down_q.weight, E, I)
    check(out, reference_moe(x, index, weights, gate_up_dq, down_dq), torch.float32)


def routed_inputs(model, tokens: int, seed=0):
    block = model.model.layers[0].mlp
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)).to(block.gate.weight.device)
    _, weights, index = block.gate(hidden, block.expert_bias)
    return block.experts, hidden, index, weights


@torch.no_grad()
def test_tiny_model_experts_match_eager():
    model = tiny_model(seed=0).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 45)
    model.set_experts_implementation("eager")
    expected = experts(hidden, index, weights)
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    check(out, expected.double().cpu(), torch.float32)
    check(out, reference_moe(hidden, index, weights, experts.gate_up.weight, experts.down.weight), torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["absmax", "double_quant"])
def test_tiny_model_nf4_containers(compress_statistics):
    model = tiny_model(seed=1).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 17, seed=1)
    experts.gate_up, gate_up_dq = quantize_container(experts.gate_up.weight.data, compress_statistics)
    experts.down, down_dq = quantize_container(experts.down.weight.data, compress_statistics)
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    check(out, reference_moe(hidden, index, weights, gate_up_dq, down_dq), torch.float32)


@torch.no_grad()
def test_whole_model_through_experts_interface():
    name = "llada_fused"
    if name not in ALL_EXPERTS_FUNCTIONS:  # the modeling file registers it; register under a test name otherwise
        name = "llada_fused_test"
        ALL_EXPERTS_FUNCTIONS.register(name, fm.fused_moe_experts_forward)
    model = tiny_model(seed=0).to(DEVICE)
    ids = torch.randint(0, 120, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model.set_experts_implementation("eager")
    expected = model(ids).logits
    model.set_experts_implementation(name)
    logits = model(ids).logits
    check(logits, expected.double().cpu(), torch.float32)


def test_autograd_falls_back_to_grouped_mm():
    model = tiny_model(seed=0).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 10)  # router weights require grad: graph recorded
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(out, grouped_mm_experts_forward(experts, hidden, index, weights))
    (out * torch.randn_like(out)).sum().backward()
    assert experts.gate_up.weight.grad is not None and experts.gate_up.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_without_a_kernel_device_falls_back_to_grouped_mm(monkeypatch):
    monkeypatch.setattr(fm, "_interpreting", lambda: False)  # as for CPU tensors outside the interpreter
    model = tiny_model(seed=0)
    experts, hidden, index, weights = routed_inputs(model, 12)
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(out, grouped_mm_experts_forward(experts, hidden, index, weights))
    experts.gate_up, gate_up_dq = quantize_container(experts.gate_up.weight.data, True)
    experts.down, down_dq = quantize_container(experts.down.weight.data, True)
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)  # grouped_mm(_chunked) over dequantized
    check(out, reference_moe(hidden, index, weights, gate_up_dq, down_dq), torch.float32)


@torch.no_grad()
def test_cpu_layout_container_falls_back_to_chunked_grouped_mm():
    # bitsandbytes' AVX512-BF16 CPU layout (what its Linear4bit forward writes on such hosts), made here on any host.
    model = tiny_model(seed=0)
    experts, hidden, index, weights = routed_inputs(model, 12)
    experts.gate_up, gate_up_dq = quantize_container(experts.gate_up.weight.data, False)
    experts.down, down_dq = quantize_container(experts.down.weight.data, False)
    weight = experts.gate_up.weight
    # The CPU layout keeps absmax in bf16: the values the container holds from then on.
    gate_up_dq = reference_dequantize_4bit(weight, absmax_dtype=torch.bfloat16)
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with pytest.raises(ValueError, match="AVX512-BF16 CPU layout"):
        fm._describe_weight(weight, 2 * I * E, H)
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)  # read through grouped_mm_chunked
    check(out, reference_moe(hidden, index, weights, gate_up_dq, down_dq), torch.float32)


def test_nf4_training_falls_back_to_chunked_grouped_mm_with_gradients():
    model = tiny_model(seed=0).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 5)
    experts.gate_up, gate_up_dq = quantize_container(experts.gate_up.weight.data, False)
    hidden = hidden.detach().requires_grad_()
    out = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    expected = reference_moe(hidden.detach(), index, weights, gate_up_dq, experts.down.weight.data)
    check(out.detach(), expected, torch.float32)
    out.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_module_imports_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError, as on a machine without it.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\nsys.modules['triton.language'] = None\n"
        "import modeling_llada_moe.fused_moe as module\n"
        "assert module.triton is None\n"
        "try:\n    module.fused_moe_experts_forward(None, None, None, None)\n"
        "except ImportError as error:\n    print('IMPORT ERROR:', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "IMPORT ERROR:" in result.stdout and "pip install triton" in result.stdout


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 16, 300, 5000])
def test_cuda_bf16_matches_reference(tokens):
    gate_up, down = random_weights(torch.bfloat16)
    index, weights = routing("random", tokens, 2)
    x = torch.randn(tokens, H).to(DEVICE, torch.bfloat16)
    weights = weights.to(DEVICE, torch.bfloat16)
    out = fm.fused_moe(x, index, weights, gate_up, down, E, I)
    expected = reference_moe(x[:64], index[:64], weights[:64], gate_up, down)  # the float64 loop is slow
    check(out[:64], expected, torch.bfloat16)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["absmax", "double_quant"])
def test_cuda_bf16_nf4_matches_dequantized_reference(compress_statistics):
    gate_up, down = random_weights(torch.bfloat16, seed=4)
    gate_up_q, gate_up_dq = quantize_container(gate_up, compress_statistics)
    down_q, down_dq = quantize_container(down, compress_statistics)
    index, weights = routing("random", 300, 2)
    x = torch.randn(300, H).to(DEVICE, torch.bfloat16)
    weights = weights.to(DEVICE, torch.bfloat16)
    out = fm.fused_moe(x, index, weights, gate_up_q.weight, down_q.weight, E, I)
    check(out[:64], reference_moe(x[:64], index[:64], weights[:64], gate_up_dq, down_dq), torch.bfloat16)


@pytest.fixture
def fresh_checks(monkeypatch):
    """Each test starts with no shape class checked yet, and counts the calls that reach the kernels."""
    monkeypatch.setattr(fm, "_CHECKED", {})
    monkeypatch.delenv(fm.FUSED_ENV, raising=False)
    calls = []
    kernels = fm.fused_moe

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return kernels(*args, **kwargs)

    monkeypatch.setattr(fm, "fused_moe", counted)
    return calls


@torch.no_grad()
def test_each_shape_class_is_checked_once_then_trusted(fresh_checks, monkeypatch):
    model = tiny_model(seed=0).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 9)
    fallbacks = []
    fallback = fm._fallback
    monkeypatch.setattr(fm, "_fallback", lambda *args: fallbacks.append(1) or fallback(*args))
    first = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    again = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    assert fresh_checks == [9, 9] and len(fallbacks) == 1  # grouped_mm ran once, for the check
    assert list(fm._CHECKED.values()) == [True]
    torch.testing.assert_close(first, again)
    check(first, reference_moe(hidden, index, weights, experts.gate_up.weight, experts.down.weight), torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("failure", ["compile_error", "wrong_numbers"])
def test_a_failing_kernel_falls_back_to_grouped_mm_with_one_warning(fresh_checks, monkeypatch, failure):
    from transformers.testing_utils import CaptureLogger

    def broken(*args, **kwargs):
        fresh_checks.append("broken")
        if failure == "compile_error":
            raise RuntimeError("triton.compiler.errors.CompilationError: at 12:8: unsupported on this GPU")
        return torch.full((args[0].shape[0], H), 7.0, dtype=args[0].dtype, device=args[0].device)

    monkeypatch.setattr(fm, "fused_moe", broken)
    model = tiny_model(seed=0).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 7)
    expected = grouped_mm_experts_forward(experts, hidden, index, weights)
    with CaptureLogger(fm.logger) as captured:
        out = fm.fused_moe_experts_forward(experts, hidden, index, weights)
        again = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
    assert fresh_checks == ["broken"]  # the failed class never reaches the kernels again
    assert captured.out.count("failed their check") == 1
    assert ("CompilationError" if failure == "compile_error" else "max abs difference") in captured.out


@torch.no_grad()
def test_environment_forces_either_path(fresh_checks, monkeypatch):
    model = tiny_model(seed=0).to(DEVICE)
    experts, hidden, index, weights = routed_inputs(model, 5)
    monkeypatch.setenv(fm.FUSED_ENV, "off")
    off = fm.fused_moe_experts_forward(experts, hidden, index, weights)
    assert fresh_checks == [] and fm._CHECKED == {}
    torch.testing.assert_close(off, grouped_mm_experts_forward(experts, hidden, index, weights))
    monkeypatch.setenv(fm.FUSED_ENV, "on")
    fm.fused_moe_experts_forward(experts, hidden, index, weights)
    assert fresh_checks == [5] and fm._CHECKED == {}  # run unchecked
    monkeypatch.setenv(fm.FUSED_ENV, "fast")
    with pytest.raises(ValueError, match="LLADA_MOE_FUSED='fast'.*check"):
        fm.fused_moe_experts_forward(experts, hidden, index, weights)
