"""Random calls (seeded) to `diffusion_generate` and `diffusion_loglikelihood` on tiny CPU models, mixing valid and
invalid arguments; prints `tried / ok / clear error / bad` per surface.

Besides the settings, calls draw the families of issue 23: wrong-typed hooks (`generator`, `streamer`,
`generation_config` as a dict / string / plain transformers config, `tokenizer` with `stop_strings`, `token_type_ids`,
logits processors and stopping criteria returning None, the wrong shape or NaN / +inf), inputs on the meta device,
extreme numbers (`cfg_scale=1e300`, `temperature=1e-300`, `num_return_sequences=2**40`), transformers' fields
(`max_time`, `output_attentions`, `token_healing`, ...), a model whose weights hold NaN, and log-likelihood ids of
2**70.

ok: a valid result (generation: right shape, prompt kept, no mask token, ids in the vocabulary; likelihood: a finite
score <= 0; never a result from the NaN-weight model unless `remove_invalid_values=True`). clear error: a
`ValueError` / `TypeError` of ours, naming the function. bad: anything else (a hang past the timeout, another
exception or one raised from inside torch, a wrong result).

    python scripts/fuzz_generation.py [--calls 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import traceback

import torch
from transformers import GenerationConfig

from modeling_llada_moe.apps.tiny_task import MASK_ID, PAD_ID, tiny_model, tiny_tokenizer


VOCAB = 128
NAN, INF = float("nan"), float("inf")

VALID = {
    "max_new_tokens": [1, 3, 4, 8],
    "block_length": [1, 2, 3, 4],
    "steps": [None, 8],
    "temperature": [0.0, 0.0, 0.5, 1.0, 2.5],
    "top_k": [None],
    "cfg_scale": [0.0, 0.5, 2.0, 1e30],
    "remasking": ["low_confidence", "random", "margin", "entropy"],
    "threshold": [None, 0.01, 0.5, 0.9, 1.0],
    "factor": [None, 0.5, 1.0, 4.0],
    "cache_implementation": [None, "prefix", "dual"],
    "mask_token_id": [None, MASK_ID],
    "suppress_tokens": [None, [], [3, 7], [PAD_ID]],
    "confidence_suppress_tokens": [None, [PAD_ID], [1, 2, 3]],
    "stop_at_eos": [True, False],
    "num_return_sequences": [1, 2],
    "return_dict_in_generate": [True, False],
    "output_history": [True, False],
}
BAD_NUMBERS = [NAN, INF, -INF, -1.0, "0.5", None, [1]]
INVALID = {
    "max_new_tokens": [0, -1, 2.0, "8", None],
    "block_length": [0, True, "4", 2.5],
    "steps": [0, 3.5, "4"],
    "temperature": BAD_NUMBERS,
    "top_k": [0, 2.5, "5"],
    "top_p": [0.0, 1.5, NAN, "0.9"],
    "cfg_scale": BAD_NUMBERS,
    "remasking": ["best", None, 1],
    "threshold": [0.0, 1.5, NAN, INF, "0.9"],
    "factor": [0.0, -1.0, NAN, INF, "1"],
    "cache_implementation": ["full", 1],
    "mask_token_id": [126.5, -1, VOCAB, True, PAD_ID],
    "suppress_tokens": [[MASK_ID], [t for t in range(VOCAB) if t != MASK_ID], "5", [True], [-1], [VOCAB + 5]],
    "confidence_suppress_tokens": [list(range(VOCAB)), [VOCAB + 3], [2.0]],
    "stop_at_eos": ["no", 1, None],
    "stop_strings": ["", [5], [""]],
    "num_return_sequences": [0, "2", 1.0],
    "return_dict_in_generate": ["yes", 1],
    "output_history": ["no"],
    "pad_token_id": [MASK_ID, VOCAB, -5, 1.5],
    "eos_token_id": [[PAD_ID, 999], "x"],
    "do_sample": ["False", 1],
    "use_cache": [1, "yes"],
    "cfg_scale ": [1e300, 3.5e38],  # (the space: a second entry for cfg_scale, past the float32 range)
    "temperature ": [1e-300, 1e300],  # extreme but valid: sampled correctly in log space
    "num_return_sequences ": [2**40, 2**70],
    "max_time": [-1.0, NAN, "1", 0.0, 0.0, 1e-9, 3600.0],
    "output_attentions": [True],
    "output_hidden_states": [True],
    "token_healing": [True],
    "renormalize_logits": [True, "yes"],
    "remove_invalid_values": [True, 2],
    "early_stopping": [True],
}


class Streamer:
    def put(self, value):
        pass

    def end(self):
        pass


class NoEnd:
    def put(self, value):
        pass


def processor_returning(kind):
    def process(input_ids, scores):
        if kind == "none":
            return None
        if kind == "narrow":
            return scores[:, :3]
        if kind in ("nan", "inf"):
            scores = scores.clone()
            scores[:, 5] = float(kind)
            return scores
        return scores

    return process


def criterion_returning(kind):
    def criterion(input_ids, scores, **kwargs):
        if kind == "none":
            return None
        if kind == "wide":
            return torch.ones(5, dtype=torch.bool)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    return criterion


# Objects passed beside the settings: (value, valid). Invalid ones must give a clear error.
HOOKS = {
    "generator": [("seed", False), (3, False), ([1], False)],
    "streamer": [(Streamer(), True), (3, False), (NoEnd(), False)],
    "generation_config": [("plain", True), ("plain_beams", False), ({"max_new_tokens": 8}, False), ("fast", False)],
    "tokenizer": [("tokenizer", True), ("tok", False)],
    "token_type_ids": [("zeros", True), ("abc", False), ("ones", False), ("wide", False)],
    "logits_processor": [("same", True), ("none", False), ("narrow", False), ("nan", False), ("inf", False)],
    "stopping_criteria": [("never", True), ("none", False), ("wide", False)],
    "input_device": [("meta", False), ("meta_mask", False)],
}
PROMPTS = ["ok"] * 24 + ["int32", "padded", "float", "int16", "bool", "negative", "oov", "mask", "1d", "empty", "list",
                       "mask_values"]


class Hang(Exception):
    pass


def run_with_timeout(seconds, fn, *args, **kwargs):
    def expire(signum, frame):
        raise Hang(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def ours(err: BaseException, surface: str) -> bool:
    """A ValueError / TypeError raised by our validation, naming the function or the config."""
    names = (surface, "DiffusionGenerationConfig") if surface == "diffusion_generate" else (surface,)
    return isinstance(err, (ValueError, TypeError)) and any(name in str(err) for name in names)


def make_prompt(kind: str, rng: random.Random):
    x = torch.tensor([[rng.randrange(PAD_ID) for _ in range(5)] for _ in range(2)])
    attention = None
    if kind == "padded":
        attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    elif kind == "mask_values":
        attention = torch.full(x.shape, rng.choice([2, -1, 0.5]))
    x = {
        "float": x.float(), "int16": x.short(), "bool": x.bool(), "int32": x.int(), "negative": x - 200,
        "oov": x + VOCAB, "mask": x.masked_fill(x == x[0, 0], MASK_ID), "1d": x[0], "empty": x[:, :0],
        "list": x.tolist(),
    }.get(kind, x)
    return x, attention


def hook_kwargs(rng: random.Random, x, tokenizer) -> tuple[dict, object]:
    """One or two objects of `HOOKS` (a third of the calls), as keyword arguments, and the prompt (moved to the meta
    device by `input_device`)."""
    kwargs = {}
    if rng.random() < 2 / 3 or not isinstance(x, torch.Tensor) or x.dim() != 2:
        return kwargs, x
    for name in rng.sample(sorted(HOOKS), rng.choice([1, 2])):
        value, _ = rng.choice(HOOKS[name])
        if name == "generation_config":
            plain = {"plain": GenerationConfig(max_new_tokens=8), "plain_beams": GenerationConfig(num_beams=2)}
            kwargs[name] = plain.get(value, value) if isinstance(value, str) else value
        elif name == "tokenizer":
            kwargs.update(tokenizer=tokenizer if value == "tokenizer" else value, stop_strings=["zz"])
        elif name == "token_type_ids":
            kwargs[name] = {"zeros": torch.zeros_like(x), "ones": torch.ones_like(x),
                            "wide": torch.zeros(3, 9, dtype=torch.long)}.get(value, value)
        elif name == "logits_processor":
            kwargs[name] = [processor_returning(value)]
        elif name == "stopping_criteria":
            kwargs.update(stopping_criteria=[criterion_returning(value)], pad_token_id=PAD_ID)
        elif name == "input_device":
            if value == "meta":
                x = x.to("meta")
            else:
                kwargs["attention_mask"] = torch.ones(x.shape, dtype=torch.long, device="meta")
        else:
            kwargs[name] = value
    return kwargs, x


def generation_kwargs(rng: random.Random) -> dict:
    kwargs = {name: rng.choice(values) for name, values in VALID.items() if rng.random() < 0.5}
    if kwargs.get("threshold") is not None and kwargs.get("factor") is not None:
        del kwargs["factor"]
    if kwargs.get("temperature", 0.0) > 0 and rng.random() < 0.5:
        kwargs[rng.choice(["top_k", "top_p"])] = rng.choice([1, 5]) if rng.random() < 0.5 else rng.choice([0.5, 1.0])
    if rng.random() < 0.5:
        for name in rng.sample(sorted(INVALID), rng.choice([1, 2])):
            kwargs[name.strip()] = rng.choice(INVALID[name])
    return kwargs


def fuzz_generate(models, rng, calls, timeout, tokenizer):
    counts = {"tried": 0, "ok": 0, "clear error": 0, "bad": 0}
    for _ in range(calls):
        model = rng.choice(models)
        kind = rng.choice(PROMPTS)
        x, attention = make_prompt(kind, rng)
        kwargs = {"max_new_tokens": 8, "block_length": 4, **generation_kwargs(rng)}
        kwargs = {"attention_mask": attention, "generator": torch.Generator().manual_seed(rng.randrange(2**31)),
                  **kwargs}
        hooks, x = hook_kwargs(rng, x, tokenizer)
        kwargs.update(hooks)
        counts["tried"] += 1
        try:
            out = run_with_timeout(timeout, model.diffusion_generate, x, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below
            if ours(err, "diffusion_generate"):
                counts["clear error"] += 1
            else:
                counts["bad"] += 1
                print(f"BAD diffusion_generate prompt={kind} {kwargs}: {err!r}")
                traceback.print_exc(limit=3)
            continue
        sequences = out.sequences if hasattr(out, "sequences") else out
        copies = kwargs.get("num_return_sequences", 1)
        problems = []
        if sequences.shape != (x.shape[0] * copies, x.shape[1] + kwargs["max_new_tokens"]):
            problems.append(f"shape {tuple(sequences.shape)}")
        elif not torch.equal(sequences[:, : x.shape[1]], x.repeat_interleave(copies, 0)):
            problems.append("prompt changed")
        if (sequences[:, x.shape[1]:] == MASK_ID).any():
            problems.append("mask token left")
        if int(sequences.min()) < 0 or int(sequences.max()) >= VOCAB:
            problems.append("id outside the vocabulary")
        if getattr(model, "broken", False) and not kwargs.get("remove_invalid_values"):
            problems.append("decoded from NaN logits without a word")
        if problems:
            counts["bad"] += 1
            print(f"BAD diffusion_generate prompt={kind} {kwargs}: {problems}")
        else:
            counts["ok"] += 1
    return counts


BAD_IDS = [[1.5], [True], "12", [MASK_ID], [3] * 300, None, [-1], [VOCAB], torch.tensor([[1, 2], [3, 4]]),
           torch.tensor([1.0, 2.0]), [2**70], [-(2**70)], [2**63], torch.tensor([1, 2], device="meta")]
BAD_LOGLIK = {
    "mc_samples": [0, 3, "4", 2.0],
    "batch_size": [0, True, 3, 2**40],
    "cfg_scale": [INF, NAN, -1.0, "1", 1e300],
    "mask_token_id": [126.5, VOCAB, -1, 2**70],
    "generator": [3, "seed"],
}


def valid_ids(rng: random.Random, least: int):
    ids = [rng.randrange(PAD_ID) for _ in range(rng.randrange(least, 7))]
    form = rng.random()
    return ids if form < 0.5 else torch.tensor(ids) if form < 0.8 else torch.tensor([ids], dtype=torch.int32)


def loglikelihood_call(rng: random.Random):
    mc_samples = rng.choice([1, 2, 4, 8])
    prefix, target = valid_ids(rng, 0), valid_ids(rng, 1)
    kwargs = dict(
        mc_samples=mc_samples, batch_size=rng.choice([b for b in (1, 2, 4) if mc_samples % b == 0]),
        cfg_scale=rng.choice([0.0, 0.0, 1.0, 1e30]), mask_token_id=rng.choice([None, MASK_ID]),
        generator=rng.choice([None, torch.Generator().manual_seed(1)]),
    )
    if rng.random() < 0.5:
        name = rng.choice(["prefix", "target"] + sorted(BAD_LOGLIK))
        if name == "prefix":
            prefix = rng.choice(BAD_IDS)
        elif name == "target":
            target = rng.choice(BAD_IDS + [[]])
        else:
            kwargs[name] = rng.choice(BAD_LOGLIK[name])
            if name == "batch_size" and kwargs[name] == 2**40:
                kwargs["mc_samples"] = 2**40
    return prefix, target, kwargs


def fuzz_loglikelihood(models, rng, calls, timeout):
    counts = {"tried": 0, "ok": 0, "clear error": 0, "bad": 0}
    for _ in range(calls):
        model = rng.choice(models)
        prefix, target, kwargs = loglikelihood_call(rng)
        counts["tried"] += 1
        try:
            score = run_with_timeout(timeout, model.diffusion_loglikelihood, prefix, target, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below
            if ours(err, "diffusion_loglikelihood"):
                counts["clear error"] += 1
            else:
                counts["bad"] += 1
                print(f"BAD diffusion_loglikelihood {prefix!r} {target!r} {kwargs}: {err!r}")
            continue
        if getattr(model, "broken", False):
            counts["bad"] += 1
            print(f"BAD diffusion_loglikelihood from NaN weights: score {score!r}")
        elif score.shape == () and math.isfinite(score.item()) and score.item() <= 0:
            counts["ok"] += 1
        else:
            counts["bad"] += 1
            print(f"BAD diffusion_loglikelihood {prefix!r} {target!r} {kwargs}: score {score!r}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls to diffusion_generate (a third as many to "
                        "diffusion_loglikelihood)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per call before it counts as a hang")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [tiny_model(seed=0), tiny_model(seed=0, tie_word_embeddings=True)]
    broken = tiny_model(seed=0)  # one output row NaN: every forward's logits hold NaN
    with torch.no_grad():
        broken.lm_head.weight[5] = NAN
    broken.broken = True
    models.append(broken)  # a third of the calls
    rng = random.Random(args.seed)
    results = {
        "diffusion_generate": fuzz_generate(models, rng, args.calls, args.timeout, tiny_tokenizer()),
        "diffusion_loglikelihood": fuzz_loglikelihood(models, rng, max(1, args.calls // 3), args.timeout),
    }
    for surface, counts in results.items():
        print(f"{surface}: " + " / ".join(f"{counts[key]} {key}" for key in ("tried", "ok", "clear error", "bad")))
    return 1 if any(counts["bad"] for counts in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
