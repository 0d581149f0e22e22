"""diffusion_generate: reference exactness, strategies, cache, batching, streaming, stopping, validation."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from reference_sampler import llada_reference_generate
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from modeling_llada_moe import DiffusionGenerateOutput, DiffusionGenerationConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import DIGITS, reversal_batch
from modeling_llada_moe.generation_utils import (
    confidence,
    select_by_factor,
    select_by_quota,
    select_by_threshold,
    transfer_schedule,
)


MASK, PAD = 126, 120


def prompts(batch=2, length=6, seed=0):
    return torch.randint(0, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- reference exactness -------------------------------------------------------------------------------------------


def test_official_fixture_cases_are_token_identical(official_small):
    expected = torch.load(official_small / "expected.pt", weights_only=True)
    model = LLaDAMoEForMaskedLM.from_pretrained(official_small, dtype=torch.float32).eval()
    for case in expected["cases"]:
        out = model.diffusion_generate(expected["prompts"], return_dict_in_generate=True, **case["kwargs"])
        assert torch.equal(out.sequences, case["output"]), case["name"]
        assert out.nfe.tolist() == list(case["nfe_per_row"]), case["name"]
        assert torch.equal(out.unmask_step, case["commit_step"]), case["name"]


# gen 16: blocks of 16 (1 block) or 4 (4 blocks); steps divisible (1 token/step), 2 tokens/step, remainder split.
SCHEDULES = {1: [16, 8, 6], 4: [16, 8, 12]}


@pytest.mark.parametrize(
    ("num_blocks", "steps", "cfg_scale"),
    [(b, s, c) for b in (1, 4) for s in SCHEDULES[b] for c in (0.0, 1.5)],
)
def test_matches_reference_loop(num_blocks, steps, cfg_scale):
    model = tiny_model(seed=1)
    x = prompts(3, 5, seed=steps)
    block = 16 // num_blocks
    expected = llada_reference_generate(model, x, 16, block, steps, MASK, cfg_scale=cfg_scale)
    out = model.diffusion_generate(x, max_new_tokens=16, block_length=block, steps=steps, cfg_scale=cfg_scale)
    assert torch.equal(out, expected)


def test_random_remasking_matches_reference_loop():
    model = tiny_model(seed=2)
    x = prompts(2, 4)
    expected = llada_reference_generate(
        model, x, 16, 4, 8, MASK, remasking="random", generator=torch.Generator().manual_seed(7)
    )
    out = model.diffusion_generate(
        x, max_new_tokens=16, block_length=4, steps=8, remasking="random", generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(out, expected)


def test_schedule_is_front_loaded():
    assert transfer_schedule(torch.tensor([10, 32, 3]), 4).tolist() == [[3, 3, 2, 2], [8, 8, 8, 8], [1, 1, 1, 0]]


# --- strategy functions -------------------------------------------------------------------------------------------


def test_threshold_rule_keeps_best_and_inclusive_threshold():
    scores = torch.tensor([[0.2, 0.9, 0.95, 0.5], [0.1, 0.3, 0.2, 0.89]])
    candidates = torch.tensor([[True, True, True, True], [True, True, False, True]])
    chosen = select_by_threshold(scores, candidates, 0.9)
    assert chosen.tolist() == [[False, True, True, False], [False, False, False, True]]  # row 2: none pass -> best
    none = select_by_threshold(scores, torch.zeros_like(candidates), 0.9)
    assert not none.any()


def test_factor_rule_commits_the_passing_prefix():
    # thresholds 1 - f/(i+1) for f=1: i=2 -> 0.667, i=3 -> 0.75, i=4 -> 0.8
    scores = torch.tensor([[0.5, 0.9, 0.7, 0.76], [0.3, 0.2, 0.1, 0.05]])
    candidates = torch.ones_like(scores, dtype=torch.bool)
    chosen = select_by_factor(scores, candidates, 1.0)
    assert chosen.tolist() == [[False, True, False, True], [True, False, False, False]]
    masked = select_by_factor(scores, torch.tensor([[True, False, True, True], [False] * 4]), 1.0)
    assert masked.tolist() == [[False, False, True, True], [False] * 4]


def test_quota_selection_is_per_row_topk():
    scores = torch.tensor([[0.1, 0.7, float("-inf"), 0.3], [0.9, 0.2, 0.4, float("-inf")]])
    assert select_by_quota(scores, torch.tensor([2, 1])).tolist() == [
        [False, True, False, True],
        [True, False, False, False],
    ]


def test_confidence_scores():
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]]))
    proposal = logits.argmax(-1)
    torch.testing.assert_close(confidence(logits, proposal, "low_confidence", None, None), torch.tensor([[0.6, 0.4]]))
    torch.testing.assert_close(confidence(logits, proposal, "margin", None, None), torch.tensor([[0.3, 0.05]]))
    entropy = confidence(logits, proposal, "entropy", None, None)
    assert entropy[0, 0] > entropy[0, 1]  # the peakier position ranks higher
    # Suppressing token 0 removes its probability: the first position (proposing 0) now scores 0.
    suppressed = confidence(logits, proposal, "low_confidence", [0], None)
    torch.testing.assert_close(suppressed, torch.tensor([[0.0, 0.0]]))


@pytest.mark.parametrize("remasking", ["margin", "entropy", "low_confidence", "random"])
def test_every_remasking_strategy_fills_the_canvas(remasking):
    model = tiny_model()
    out = model.diffusion_generate(prompts(), max_new_tokens=8, block_length=4, remasking=remasking)
    assert out.shape == (2, 14) and not (out == MASK).any()


# --- sampling -----------------------------------------------------------------------------------------------------


def test_temperature_sampling_is_reproducible_with_a_generator():
    model = tiny_model()
    kwargs = dict(max_new_tokens=8, block_length=8, temperature=1.0)
    first = model.diffusion_generate(prompts(), generator=torch.Generator().manual_seed(0), **kwargs)
    again = model.diffusion_generate(prompts(), generator=torch.Generator().manual_seed(0), **kwargs)
    other = model.diffusion_generate(prompts(), generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_top_k_one_and_tiny_top_p_sample_the_argmax():
    model = tiny_model()
    greedy = model.diffusion_generate(prompts(), max_new_tokens=8, block_length=8)
    for filters in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = model.diffusion_generate(
            prompts(), max_new_tokens=8, block_length=8, temperature=2.0, generator=torch.Generator(), **filters
        )
        assert torch.equal(sampled, greedy), filters


def test_suppress_tokens_never_appear():
    model = tiny_model()
    first = model.diffusion_generate(prompts(), max_new_tokens=8, block_length=8)
    banned = first[:, 6:].unique().tolist()
    out = model.diffusion_generate(prompts(), max_new_tokens=8, block_length=8, suppress_tokens=banned)
    assert not torch.isin(out[:, 6:], torch.tensor(banned)).any()


def test_num_return_sequences_and_generate_delegates():
    model = tiny_model()
    out = model.diffusion_generate(prompts(), max_new_tokens=8, block_length=4, num_return_sequences=3)
    assert out.shape == (6, 14) and torch.equal(out[0], out[2])
    assert torch.equal(model.generate(prompts(), max_new_tokens=8, block_length=4), out[::3])


# --- parallel decoding and caches -----------------------------------------------------------------------------------


def test_threshold_decoding_commits_several_tokens_per_forward(reversal_model):
    tasks = reversal_batch(8, torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=DIGITS, block_length=DIGITS, return_dict_in_generate=True)
    reference = reversal_model.diffusion_generate(tasks[:, :DIGITS], **kwargs)
    out = reversal_model.diffusion_generate(tasks[:, :DIGITS], threshold=0.9, **kwargs)
    assert isinstance(out, DiffusionGenerateOutput) and not (out.sequences == MASK).any()
    assert reference.nfe.tolist() == [DIGITS] * 8 and (reference.tokens_per_forward == 1).all()
    assert out.nfe.float().mean() < DIGITS / 2 and (out.tokens_per_forward >= 1).all()
    assert out.unmask_step.max(dim=1).values.tolist() == (out.nfe - 1).tolist()
    agreement = (out.sequences == reference.sequences).float().mean()
    assert agreement > 0.9
    factor = reversal_model.diffusion_generate(tasks[:, :DIGITS], factor=1.0, **kwargs)
    assert not (factor.sequences == MASK).any() and factor.nfe.float().mean() < DIGITS


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_caches_are_exact_for_a_one_layer_model(mode):
    # With one layer a position's key depends only on its own token, so a frozen cache holds exact values.
    model = tiny_model(seed=5, num_hidden_layers=1, moe_layer_freq=[1])
    x = prompts(2, 5)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    for kwargs in (dict(steps=16), dict(threshold=0.3)):
        plain = model.diffusion_generate(x, attention_mask=mask, max_new_tokens=16, block_length=8, **kwargs)
        cached = model.diffusion_generate(
            x, attention_mask=mask, max_new_tokens=16, block_length=8, cache_implementation=mode, **kwargs
        )
        assert torch.equal(plain, cached), (mode, kwargs)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_outputs_stay_close_to_uncached_with_a_high_threshold(reversal_model, mode):
    tasks = reversal_batch(32, torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=DIGITS, block_length=DIGITS // 2, threshold=0.99, return_dict_in_generate=True)
    plain = reversal_model.diffusion_generate(tasks[:, :DIGITS], **kwargs)
    cached = reversal_model.diffusion_generate(tasks[:, :DIGITS], cache_implementation=mode, **kwargs)
    agreement = (plain.sequences[:, DIGITS:] == cached.sequences[:, DIGITS:]).float().mean().item()
    print(f"{mode} cache vs no cache, threshold 0.99: token agreement {agreement:.3f}")
    assert agreement >= 0.85 and not (cached.sequences == MASK).any()


# --- batching -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_left_padded_batch_rows_decode_as_alone(cache):
    model = tiny_model(seed=6)
    rows = [prompts(1, 7, seed=1)[0], prompts(1, 3, seed=2)[0], prompts(1, 5, seed=3)[0]]
    batch = torch.full((3, 7), PAD)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 7 - len(row) :], mask[i, 7 - len(row) :] = row, 1
    kwargs = dict(max_new_tokens=12, block_length=4, steps=6, cache_implementation=cache)
    together = model.diffusion_generate(batch, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        alone = model.diffusion_generate(row[None], **kwargs)
        assert torch.equal(together[i, 7:], alone[0, len(row) :]), i


# --- stopping and streaming ---------------------------------------------------------------------------------------


def test_stop_at_eos_keeps_output_up_to_first_eos_and_pads_the_rest():
    model = tiny_model(seed=8, eos_token_id=None)
    x = prompts(3, 4, seed=4)
    full = model.diffusion_generate(x, max_new_tokens=16, block_length=4, return_dict_in_generate=True)
    # Make the model's most frequent generated token the EOS, so rows stop at different blocks.
    eos = int(full.sequences[:, 4:].flatten().mode().values)
    stopped = model.diffusion_generate(
        x,
        max_new_tokens=16,
        block_length=4,
        stop_at_eos=True,
        eos_token_id=eos,
        pad_token_id=PAD,
        return_dict_in_generate=True,
    )
    stopped_any = False
    for row in range(3):
        generated = full.sequences[row, 4:]
        hits = (generated == eos).nonzero()
        if hits.numel() == 0:
            assert torch.equal(stopped.sequences[row], full.sequences[row])
            continue
        cut = int(hits[0]) + 1
        stopped_any = True
        assert torch.equal(stopped.sequences[row, : 4 + cut], full.sequences[row, : 4 + cut])
        assert (stopped.sequences[row, 4 + cut :] == PAD).all()
        assert (stopped.unmask_step[row, cut:] == -1).all()
        assert stopped.nfe[row] <= full.nfe[row]
    assert stopped_any


def test_stop_strings_cut_rows_at_block_granularity():
    model = tiny_model(seed=8)
    tokenizer = tiny_tokenizer()
    x = prompts(2, 4, seed=4)
    full = model.diffusion_generate(x, max_new_tokens=16, block_length=4)
    stop = tokenizer.decode(full[0, 9:11])  # two tokens of row 0's second block
    out = model.diffusion_generate(x, max_new_tokens=16, block_length=4, stop_strings=[stop], tokenizer=tokenizer)
    for row in range(2):
        generated = full[row, 4:]
        # Independent expectation: the shortest generated prefix whose text contains the stop string.
        cut = next((k for k in range(1, 17) if stop in tokenizer.decode(generated[:k])), None)
        if cut is None:
            assert torch.equal(out[row], full[row])
        else:
            assert torch.equal(out[row, : 4 + cut], full[row, : 4 + cut])
            assert (out[row, 4 + cut :] == PAD).all()
    assert (out[0] == PAD).any()


class Collector(BaseStreamer):
    def __init__(self):
        self.values, self.ended = [], False

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_each_final_block(capsys):
    model = tiny_model()
    streamer = Collector()
    out = model.diffusion_generate(prompts(), max_new_tokens=12, block_length=4, streamer=streamer)
    assert streamer.ended and len(streamer.values) == 4
    assert torch.equal(streamer.values[0], prompts())
    assert torch.equal(torch.cat(streamer.values[1:], dim=1), out[:, 6:])

    tokenizer = tiny_tokenizer()
    single = model.diffusion_generate(
        prompts(1), max_new_tokens=8, block_length=4, streamer=TextStreamer(tokenizer, skip_prompt=True)
    )
    assert capsys.readouterr().out.split() == tokenizer.decode(single[0, 6:]).split()


def test_history_records_every_step():
    model = tiny_model()
    out = model.diffusion_generate(
        prompts(), max_new_tokens=8, block_length=4, steps=4, output_history=True, return_dict_in_generate=True
    )
    assert len(out.history) == 4 and torch.equal(out.history[-1], out.sequences)
    masks_left = [int((h[:, 6:] == MASK).sum()) for h in out.history]
    assert masks_left == [12, 8, 4, 0]


class DraftCollector(Collector):
    def __init__(self):
        super().__init__()
        self.drafts = []

    def put_draft(self, value):
        self.drafts.append(value.clone())


def test_streamer_put_draft_sees_the_block_after_every_step():
    model = tiny_model()
    streamer = DraftCollector()
    out = model.diffusion_generate(
        prompts(), max_new_tokens=8, block_length=4, steps=4, output_history=True, return_dict_in_generate=True,
        streamer=streamer,
    )
    # Two blocks of two steps: each draft is the current block of the canvas after that step, masks in place.
    blocks = [slice(6, 10), slice(6, 10), slice(10, 14), slice(10, 14)]
    assert len(streamer.drafts) == 4
    assert all(torch.equal(d, h[:, b]) for d, h, b in zip(streamer.drafts, out.history, blocks))
    assert [int((d == MASK).sum()) for d in streamer.drafts] == [4, 0, 4, 0]
    assert torch.equal(torch.cat(streamer.values[1:], dim=1), out.sequences[:, 6:]) and streamer.ended


# --- configuration and validation ---------------------------------------------------------------------------------


def test_generation_config_defaults_and_round_trip(tmp_path):
    config = DiffusionGenerationConfig()
    assert (config.temperature, config.top_k, config.top_p, config.block_length) == (0.0, None, None, 32)
    assert config.total_steps == config.max_new_tokens == 128 and config.remasking == "low_confidence"
    model = tiny_model()
    model.generation_config.threshold = 0.9
    model.generation_config.block_length = 8
    model.save_pretrained(tmp_path)
    reloaded = LLaDAMoEForMaskedLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.generation_config, DiffusionGenerationConfig)
    assert (reloaded.generation_config.threshold, reloaded.generation_config.block_length) == (0.9, 8)
    assert reloaded.generation_config.mask_token_id == MASK and reloaded.generation_config.temperature == 0.0


def test_presets_name_the_reference_fast_dllm_and_dinfer_settings():
    llada = DiffusionGenerationConfig.from_preset("llada")
    assert (llada.threshold, llada.factor, llada.cache_mode, llada.temperature) == (None, None, None, 0.0)
    fast = DiffusionGenerationConfig.from_preset("fast_dllm", max_new_tokens=64)
    assert (fast.threshold, fast.cache_mode, fast.max_new_tokens) == (0.9, "dual", 64)
    dinfer = DiffusionGenerationConfig.from_preset("dinfer")
    assert dinfer.cache_mode == "dual" and dinfer.threshold is not None
    # an override beats the preset, and a preset switches off what another turned on
    assert DiffusionGenerationConfig.from_preset("fast_dllm", threshold=0.5).threshold == 0.5
    assert DiffusionGenerationConfig.from_preset("llada", use_cache=False).cache_mode is None


def test_llada_preset_is_the_reference_sampler():
    model = tiny_model(seed=1)
    x = prompts(2, 5)
    expected = llada_reference_generate(model, x, 16, 4, 8, MASK)
    config = DiffusionGenerationConfig.from_preset("llada", max_new_tokens=16, block_length=4, steps=8)
    assert torch.equal(model.diffusion_generate(x, generation_config=config), expected)


@pytest.mark.parametrize(
    ("name", "overrides", "error", "message"),
    [
        ("fastdllm", {}, ValueError, r"unknown preset 'fastdllm'; expected one of \('llada', 'fast_dllm', 'dinfer'"),
        (None, {}, ValueError, "unknown preset None"),
        ("fast_dllm", {"threshold": 1.5}, ValueError, "`threshold`=1.5"),
        ("dinfer", {"block_length": "8"}, TypeError, "`block_length`='8'"),
    ],
)
def test_bad_presets_and_overrides_raise(name, overrides, error, message):
    with pytest.raises(error, match=message):
        DiffusionGenerationConfig.from_preset(name, **overrides)


BAD_CALLS = {
    "steps": (dict(max_new_tokens=16, block_length=4, steps=3), "`steps`=3"),
    "block_length": (dict(max_new_tokens=16, block_length=0), "`block_length`=0"),
    "max_length_too_short": (dict(max_length=6, block_length=8), "max_length=6"),
    "max_length_disagrees": (dict(max_length=20, max_new_tokens=8), "disagree"),
    "mask_outside_vocab": (dict(max_new_tokens=8, block_length=8, mask_token_id=500), "mask_token_id=500"),
    "mask_is_pad": (dict(max_new_tokens=8, block_length=8, mask_token_id=PAD), "equals mask_token_id"),
    "too_long": (dict(max_new_tokens=256, block_length=8), "exceeds max_position_embeddings=256"),
    "remasking": (dict(max_new_tokens=8, block_length=8, remasking="lowest"), "`remasking`='lowest'"),
    "unknown_kwarg": (dict(max_new_tokens=8, block_length=8, foo=1), r"unknown keyword argument\(s\) \['foo'\]"),
    "num_beams": (dict(max_new_tokens=8, block_length=8, num_beams=4), "`num_beams`=4"),
    "threshold_and_factor": (dict(max_new_tokens=8, block_length=8, threshold=0.9, factor=1.0), "exclusive"),
    "use_cache": (dict(max_new_tokens=8, block_length=8, use_cache="full"), "`use_cache`='full'"),
    "cache_implementation": (
        dict(max_new_tokens=8, block_length=8, cache_implementation="static"), "`cache_implementation`='static'"
    ),
    "cache_off_and_on": (dict(max_new_tokens=8, use_cache=False, cache_implementation="dual"), "use_cache=False"),
    "top_p_greedy": (dict(max_new_tokens=8, block_length=8, top_p=0.9), "`top_p`=0.9"),
    "stop_strings_no_tokenizer": (dict(max_new_tokens=8, block_length=8, stop_strings="x"), "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_generation_arguments_raise_before_any_forward(case):
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    kwargs, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        model.diffusion_generate(prompts(), **kwargs)
    assert not calls


def test_bad_prompts_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt is empty"):
        model.diffusion_generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=8, block_length=8)
    right_padded = torch.ones(2, 6, dtype=torch.long)
    right_padded[0, 4:] = 0
    with pytest.raises(ValueError, match="right padding"):
        model.diffusion_generate(prompts(), attention_mask=right_padded, max_new_tokens=8, block_length=8)


# --- likelihood ---------------------------------------------------------------------------------------------------


def test_loglikelihood_of_one_token_is_exact_and_estimates_are_deterministic():
    model = tiny_model()
    prefix, target = prompts(1, 5)[0], torch.tensor([17])
    estimate = model.diffusion_loglikelihood(prefix, target, mc_samples=4, batch_size=2)
    canvas = torch.cat([prefix, torch.tensor([MASK])])[None]
    exact = torch.log_softmax(model(canvas).logits[0, -1].float(), -1)[17]
    torch.testing.assert_close(estimate, exact, atol=1e-5, rtol=0)

    long_target = prompts(1, 6, seed=9)[0]
    runs = [
        model.diffusion_loglikelihood(prefix, long_target, 8, 4, generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] < 0
    guided = model.diffusion_loglikelihood(prefix, long_target, 4, 4, cfg_scale=1.0, generator=torch.Generator())
    assert torch.isfinite(guided)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        model.diffusion_loglikelihood(prefix, long_target, mc_samples=6, batch_size=4)


def test_loglikelihood_prefers_the_learned_answer(reversal_model):
    tasks = reversal_batch(4, torch.Generator().manual_seed(3))
    for row in tasks:
        prefix, answer = row[:DIGITS], row[DIGITS:]
        wrong = answer.roll(1) if not torch.equal(answer.roll(1), answer) else (answer % 10) + 1
        right_score, wrong_score = (
            reversal_model.diffusion_loglikelihood(prefix, target, 16, 8, generator=torch.Generator().manual_seed(0))
            for target in (answer, wrong)
        )
        assert right_score > wrong_score
