"""`generate` behaves like transformers' `GenerationMixin.generate` and DiffusionGemma's: calling forms, pipelines,
`use_cache` / `cache_implementation`, `max_length`, uneven blocks, logits processors, stopping criteria, streamers."""

import functools
import io
import json
import threading
import warnings
from contextlib import redirect_stdout
from datetime import timedelta

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    EosTokenCriteria,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensLogitsProcessor,
    TextDiffusionStreamer,
    TextIteratorStreamer,
    pipeline,
)

from modeling_llada_moe import DiffusionGenerationConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE
from modeling_llada_moe.generation_utils import split_blocks, split_steps


MASK, PAD = 126, 120
SMALL = dict(max_new_tokens=8, block_length=4)


@functools.cache
def shared_model() -> LLaDAMoEForMaskedLM:
    return tiny_model(seed=3)


@pytest.fixture
def model():
    return shared_model()


def prompts(batch=2, length=6, seed=0):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- calling forms and pipelines ------------------------------------------------------------------------------------


def test_generate_takes_input_ids_keyword_tokenizer_outputs_and_generation_config(model):
    tokenizer = tiny_tokenizer()
    inputs = tokenizer(["t1 t2 t3 t4"], return_tensors="pt")
    expected = model.generate(inputs["input_ids"], **SMALL)
    assert torch.equal(model.generate(input_ids=inputs["input_ids"], **SMALL), expected)
    assert torch.equal(model.generate(**inputs, **SMALL), expected)  # input_ids, attention_mask (+ token types)
    assert torch.equal(model.generate(inputs["input_ids"], DiffusionGenerationConfig(**SMALL)), expected)
    overridden = model.generate(**inputs, generation_config=DiffusionGenerationConfig(max_new_tokens=16), **SMALL)
    assert torch.equal(overridden, expected)
    with pytest.raises(ValueError, match="given twice"):
        model.generate(inputs["input_ids"], input_ids=inputs["input_ids"], **SMALL)
    with pytest.raises(ValueError, match="assistant_model=.*not supported"):
        model.generate(inputs["input_ids"], assistant_model=model, **SMALL)


def test_text_generation_pipeline_with_text_and_with_chat_messages(model):
    tokenizer = tiny_tokenizer(LING_CHAT_TEMPLATE)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)

    out = generator("t1 t2 t3", max_new_tokens=8, return_full_text=False)
    ids = tokenizer("t1 t2 t3", return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=8)[0, ids.shape[1] :], skip_special_tokens=True)
    assert out == [{"generated_text": expected}] and expected

    messages = [{"role": "user", "content": "t4 t5"}]
    chat = generator(messages, max_new_tokens=8)[0]["generated_text"]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=8)[0, prompt["input_ids"].shape[1] :]
    assert chat == [*messages, {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)}]


def test_from_pretrained_without_a_folder(model):
    rebuilt = LLaDAMoEForMaskedLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    assert isinstance(rebuilt.generation_config, DiffusionGenerationConfig)
    assert torch.equal(rebuilt.generate(prompts(), **SMALL), model.generate(prompts(), **SMALL))


# --- use_cache, cache_implementation, max_length, uneven blocks ----------------------------------------------------


def test_use_cache_is_a_bool_and_the_cache_kind_is_cache_implementation(model, tmp_path):
    x = prompts()
    kwargs = dict(max_new_tokens=16, block_length=8, threshold=0.3)
    plain = model.generate(x, **kwargs)
    prefix = model.generate(x, cache_implementation="prefix", **kwargs)
    assert torch.equal(model.generate(x, use_cache=True, **kwargs), prefix)
    dual = DiffusionGenerationConfig(cache_implementation="dual", **kwargs)
    assert torch.equal(model.generate(x, dual, use_cache=False), plain)  # False turns a configured cache off
    assert torch.equal(model.generate(x, use_cache=False, **kwargs), plain)

    # Configs saved with the old string field load as cache_implementation, with a deprecation warning.
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, "use_cache": "dual"}))
    with pytest.warns(FutureWarning, match="cache_implementation='dual'"):
        reloaded = LLaDAMoEForMaskedLM.from_pretrained(tmp_path)
    assert (reloaded.generation_config.use_cache, reloaded.generation_config.cache_implementation) == (True, "dual")


def test_max_length_is_prompt_plus_canvas(model):
    x = prompts()  # 6 prompt tokens
    out = model.generate(x, max_length=14, block_length=4)
    assert out.shape == (2, 14) and torch.equal(out, model.generate(x, max_new_tokens=8, block_length=4))
    configured = DiffusionGenerationConfig(max_length=10, block_length=4)
    assert model.generate(x, configured).shape == (2, 10)
    assert model.generate(x, configured, max_new_tokens=8).shape == (2, 14)  # the call's canvas wins
    assert model.generate(x, max_length=14, max_new_tokens=8, block_length=4).shape == (2, 14)


def test_a_canvas_that_is_not_whole_blocks_ends_with_a_shorter_block(model):
    x = prompts()
    out = model.generate(x, max_new_tokens=20, return_dict_in_generate=True)  # default block_length 32
    assert out.sequences.shape == (2, 26) and not (out.sequences == MASK).any()
    assert torch.equal(out.sequences, model.generate(x, max_new_tokens=20, block_length=20))
    # Blocks of 8 and 4, one token per step: 12 forwards, the last block decoded after the first is final.
    uneven = model.generate(x, max_new_tokens=12, block_length=8, return_dict_in_generate=True)
    assert uneven.nfe.tolist() == [12, 12] and (uneven.unmask_step[:, 8:] >= 8).all()


def test_steps_split_in_proportion_to_block_lengths():
    assert split_blocks(40, 32) == [32, 8] and split_blocks(32, 8) == [8] * 4 and split_blocks(5, 32) == [5]
    assert split_steps(16, [4] * 4) == [4] * 4 and split_steps(8, [4] * 4) == [2] * 4  # LLaDA's even split
    assert split_steps(40, [32, 8]) == [32, 8] and split_steps(10, [32, 8]) == [8, 2]
    assert split_steps(2, [32, 1]) == [1, 1]  # at least one step per block


@settings(max_examples=10, deadline=timedelta(seconds=60), derandomize=True)
@given(
    new_tokens=st.integers(1, 16),
    block=st.integers(1, 32),
    extra_steps=st.one_of(st.none(), st.integers(0, 8)),
    threshold=st.sampled_from([None, 0.5]),
)
def test_any_valid_canvas_block_and_steps_fill_the_canvas(new_tokens, block, extra_steps, threshold):
    model = shared_model()
    blocks = -(-new_tokens // block)
    steps = None if extra_steps is None else min(blocks + extra_steps, new_tokens)  # at most one step per token
    out = model.generate(
        prompts(1, 3), max_new_tokens=new_tokens, block_length=block, steps=steps, threshold=threshold,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (1, 3 + new_tokens) and not (out.sequences == MASK).any()
    if threshold is None:
        assert int(out.nfe[0]) == (steps or new_tokens)


# --- logits processors and stopping criteria ------------------------------------------------------------------------


def test_logits_processors_act_on_every_step(model):
    x = prompts()
    plain = model.generate(x, **SMALL)
    banned = plain[:, 6:].unique().tolist()
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(banned)])
    suppressed = model.generate(x, logits_processor=processors, **SMALL)
    assert not torch.isin(suppressed[:, 6:], torch.tensor(banned)).any()
    bad = int(plain[0, 6])
    no_bad = model.generate(x, logits_processor=[NoBadWordsLogitsProcessor([[bad]], eos_token_id=PAD)], **SMALL)
    assert not (no_bad[:, 6:] == bad).any() and not torch.equal(no_bad, plain)
    with pytest.raises(TypeError, match="logits_processor=3"):
        model.generate(x, logits_processor=3, **SMALL)


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_cut_rows_at_the_first_position_once_a_block_is_final(model):
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["abcdef"])  # StopStringCriteria reads the vocabulary's text after this probe word
    x = prompts(1, 4, seed=4)
    kwargs = dict(max_new_tokens=16, block_length=4, return_dict_in_generate=True)
    full = model.generate(x, **kwargs)
    generated = full.sequences[0, 4:].tolist()

    custom = model.generate(x, stopping_criteria=StoppingCriteriaList([StopAfter(4 + 6)]), **kwargs)
    assert torch.equal(custom.sequences[0, :10], full.sequences[0, :10]) and (custom.sequences[0, 10:] == PAD).all()
    assert int(custom.nfe[0]) == 8  # the third and fourth blocks were never decoded

    token = generated[9]  # a token of the third block: the cut is its first occurrence
    cut = generated.index(token) + 1
    stop = StopStringCriteria(tokenizer, [tokenizer.convert_ids_to_tokens(token)])
    stopped = model.generate(x, stopping_criteria=[stop], **kwargs).sequences
    assert torch.equal(stopped[0, : 4 + cut], full.sequences[0, : 4 + cut]) and (stopped[0, 4 + cut :] == PAD).all()

    eos = model.generate(x, stopping_criteria=[EosTokenCriteria(token)], **kwargs).sequences
    at_eos = model.generate(x, stop_at_eos=True, eos_token_id=token, pad_token_id=PAD, **kwargs).sequences
    assert torch.equal(eos, at_eos)
    assert torch.equal(eos, stopped)


# --- streamers ------------------------------------------------------------------------------------------------------


class RecordingDiffusionStreamer(TextDiffusionStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.drafts, self.texts = [], []

    def put_draft(self, value, **kwargs):
        self.drafts.append(value.clone())
        super().put_draft(value, **kwargs)

    def on_finalized_text(self, text, stream_end=False):
        self.texts.append(text)
        super().on_finalized_text(text, stream_end)


def test_text_diffusion_streamer_and_text_iterator_streamer(model):
    tokenizer = tiny_tokenizer()
    x = prompts(1)
    expected = model.generate(x, steps=4, return_dict_in_generate=True, **SMALL)
    answer = tokenizer.decode(expected.sequences[0, 6:])

    streamer = RecordingDiffusionStreamer(tokenizer)
    with redirect_stdout(io.StringIO()) as printed:
        out = model.generate(x, steps=4, streamer=streamer, **SMALL)
    assert torch.equal(out, expected.sequences) and len(streamer.drafts) == int(expected.nfe[0]) == 4
    assert [d.shape for d in streamer.drafts] == [(1, 4)] * 4 and int((streamer.drafts[0] == MASK).sum()) == 2
    assert "".join(streamer.texts).split() == answer.split() and "\033[33m" in printed.getvalue()  # drafts shown

    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    with warnings.catch_warnings():
        worker = threading.Thread(target=model.generate, args=(x,), kwargs=dict(steps=4, streamer=iterator, **SMALL))
        worker.start()
        streamed = "".join(iterator)
        worker.join()
    assert streamed.split() == answer.split()
