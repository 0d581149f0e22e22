"""Issue 14, item 6: the sampling loop's forwards through `torch.compile` (`compile_config`).

On CPU the graphs are captured by dynamo and run by a recording backend (inductor's C++ build takes minutes on two
cores): the compiled loop must give the eager loop's tokens, NFE and commit steps, the forward must capture without
graph breaks (`fullgraph=True`), and the number of graphs must not grow with the number of blocks (static shapes per
block: finished rows stay in the batch). The CUDA checks (inductor, CUDA graphs) are marked `gpu`."""

import pytest
import torch
import torch._inductor.config
from conftest import tiny_model
from transformers import CompileConfig
from transformers.generation.logits_process import LogitsProcessor


MASK = 126


def prompts(batch=2, length=5, seed=0):
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def recording_config(graphs: list, **kwargs) -> CompileConfig:
    """A CompileConfig whose backend runs each captured graph as is and records it (CompileConfig deep-copies its
    fields; a function is copied by reference, so `graphs` is the list the backend appends to)."""

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return CompileConfig(backend=backend, mode="default", **{"dynamic": None, **kwargs})


def fresh(model):
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    return model


class SureOfRowZero(LogitsProcessor):
    """Row 0 (its prompt starts with 7) is certain of token 5 everywhere, so it fills each block in one forward."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[input_ids[:, 0] == 7, 5] += 100.0
        return scores


MODES = {
    "reference": dict(),
    "threshold_dual": dict(threshold=0.5, cache_implementation="dual"),
    "prefix_cfg": dict(threshold=0.7, cache_implementation="prefix", cfg_scale=1.0),
    "dinfer_smooth": dict(threshold=0.76, low_threshold=0.62, cache_implementation="dual", cache_vicinity=(2, 2),
                          cont_weight=0.3, threshold_decay=0.02),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_compiled_loop_gives_the_eager_tokens_with_a_few_graphs_for_many_blocks(mode):
    model = tiny_model(seed=7)
    x = prompts(2, 5)
    kwargs = dict(max_new_tokens=24, block_length=4, return_dict_in_generate=True, **MODES[mode])  # 6 blocks
    eager = model.diffusion_generate(x, **kwargs)
    graphs = []
    config = recording_config(graphs, fullgraph=True)  # fullgraph: the forward captures without a graph break
    compiled = fresh(model).diffusion_generate(x, compile_config=config, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.nfe, eager.nfe) and torch.equal(compiled.unmask_step, eager.unmask_step)
    assert not (compiled.sequences == MASK).any()
    # static shapes per block: the refresh, the first block's step, any later block's step (its start made
    # dynamic) and a vicinity window clipped at the canvas end; one graph per block would be 7 or more
    assert 1 <= len(graphs) <= 4
    count = len(graphs)
    again = model.diffusion_generate(x, compile_config=config, **kwargs)
    assert len(graphs) == count and torch.equal(again.sequences, eager.sequences)  # compiled once per model


def test_finished_rows_stay_in_the_batch_while_compiling():
    model = tiny_model(seed=8)
    x = prompts(2, 5, seed=2)
    x[0, 0], x[1, 0] = 7, 8
    kwargs = dict(
        block_length=4, threshold=1.0, cache_implementation="dual", logits_processor=[SureOfRowZero()],
        return_dict_in_generate=True,
    )
    eager = model.diffusion_generate(x, max_new_tokens=24, **kwargs)
    graphs = []
    compiled = fresh(model).diffusion_generate(x, max_new_tokens=24, compile_config=recording_config(graphs), **kwargs)
    # row 0 fills each block in one forward and takes part in no more of them (NFE), yet stays in the batch
    assert compiled.nfe.tolist() == eager.nfe.tolist() == [6, 24]
    assert torch.equal(compiled.sequences, eager.sequences)
    assert {graph_inputs_batch(graph) for graph in graphs} == {2} and len(graphs) <= 3


def graph_inputs_batch(graph) -> int:
    """The batch size of a captured forward (its first 2-D integer input: the token ids)."""
    for node in graph.graph.nodes:
        value = node.meta.get("example_value")
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() == 2:
            if not value.is_floating_point():
                return int(value.shape[0])
    raise AssertionError("no token-id input in the graph")


def test_disable_compile_and_bad_compile_configs():
    model = tiny_model(seed=7)
    x = prompts(1, 5)
    graphs = []
    out = fresh(model).diffusion_generate(
        x, max_new_tokens=4, block_length=4, compile_config=recording_config(graphs), disable_compile=True
    )
    assert not graphs and not (out == MASK).any()
    with pytest.raises(TypeError, match="`compile_config`=.*CompileConfig"):
        model.diffusion_generate(x, max_new_tokens=4, compile_config={"mode": "default"})
    with pytest.raises(TypeError, match="`disable_compile`='yes'"):
        model.diffusion_generate(x, max_new_tokens=4, disable_compile="yes")


# --- CUDA: inductor and CUDA graphs ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["threshold_dual", "reference"])
def test_cuda_inductor_loop_gives_the_eager_tokens(mode):
    model = tiny_model(seed=7).cuda()
    x = prompts(2, 5).cuda()
    kwargs = dict(max_new_tokens=16, block_length=4, return_dict_in_generate=True, **MODES[mode])
    eager = model.diffusion_generate(x, **kwargs)
    config = CompileConfig(mode="default" if "cache_implementation" in MODES[mode] else "reduce-overhead")
    compiled = fresh(model).diffusion_generate(x, compile_config=config, **kwargs)
    again = model.diffusion_generate(x, compile_config=config, **kwargs)  # graph replays
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(again.sequences, eager.sequences)
    assert torch.equal(compiled.nfe, eager.nfe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_with_a_block_cache_are_refused():
    model = tiny_model(seed=7).cuda()
    with pytest.raises(ValueError, match="reduce-overhead"):
        model.diffusion_generate(
            prompts(1, 5).cuda(), max_new_tokens=4, cache_implementation="dual", compile_config=CompileConfig()
        )


def test_inductor_compiles_a_small_case_on_cpu_with_the_eager_tokens():
    # The recording backend above checks capture; this runs inductor's real code generation (C++ kernels) once, on
    # a one-layer model and one 4-token block (about a minute on one busy core, mostly the C++ build).
    model = fresh(tiny_model(seed=7, num_hidden_layers=1, moe_layer_freq=[1]))
    x = prompts()
    kwargs = dict(max_new_tokens=4, block_length=4, return_dict_in_generate=True)
    eager = model.diffusion_generate(x, **kwargs)
    config = CompileConfig(backend="inductor", mode="default", fullgraph=True, dynamic=None)
    with torch._inductor.config.patch(compile_threads=1):
        compiled = model.diffusion_generate(x, compile_config=config, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert compiled.nfe.tolist() == eager.nfe.tolist()
    assert torch.equal(compiled.unmask_step, eager.unmask_step)
    torch._dynamo.reset()
