"""Masked-diffusion SFT for LLaDA-MoE as a TRL `SFTTrainer`.

The LLaDA SFT objective: the prompt stays clean; each row draws a masking probability t, every response token
(the right-padded EOS tail included) is masked with probability t, and the loss is the cross-entropy of the masked
tokens weighted by 1/t, normalised by the row's answer length and averaged over rows. MoE load-balancing and
router z-losses come from the model's router logits.

Conversational data (a `messages` column) is trained on the assistant turns only: every assistant turn (content and
its `<|role_end|>`) is response, may be masked and is scored; system, user and tool turns and the role headers are
prompt, never masked and never scored. In a multi-turn conversation all assistant turns are masked at once with the
row's t (an any-order ELBO of every assistant token given the rest); the EOS tail follows the conversation only when it
ends on an assistant turn. For LLaDA's "the last assistant turn given the history" use prompt-completion data with
the history as `prompt`.

Every random draw (noise levels, masks, the random-length crop) comes from generators seeded by `args.seed`, the
optimizer step and the row's position in the step's global batch (process p's row i of n is row p*n + i), never from
the global RNG: resuming from a checkpoint continues bit for bit, gradient accumulation of k micro-batches draws
exactly what one batch of the same rows draws, and N processes (DDP, FSDP2) draw what one process given the whole
global batch draws.
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers

from modeling_llada_moe.forward_process import (
    TIME_EPSILON,
    bernoulli_mask,
    example_generator,
    masked_token_nll,
)

from .common import (
    check_choice,
    check_flag,
    check_mask_in_vocab,
    check_mask_token_id_field,
    check_number,
    eos_token_id,
    refuse_router_aux_loss,
    restore_router_settings,
    router_settings,
    step_share_of_loss,
)
from .data_checks import (
    CONVERSATION,
    PROMPT,
    RESPONSE,
    TOKEN_IDS,
    Column,
    check_container,
    check_containers,
    check_dataset,
    check_mask_token_id,
    check_not_emptied,
    check_prepared_tokens,
    column_names,
    dataset_name,
    prepared_dataset_name,
    shorten,
)
from .sharded_checkpoints import ShardedCheckpoints


NORMALIZATIONS = ("answer_length", "supervised_tokens", "batch", "all_tokens")
# A Ling-style (LLaDA-MoE Instruct) chat template with {% generation %} markers, so TRL's assistant_only_loss can
# find the assistant spans (the official template has none).
TRAINING_CHAT_TEMPLATE_PATH = Path(__file__).with_name("templates") / "llada_moe_training.jinja"
# Independent random streams of `example_generator`: training rows, evaluation rows, the per-step crop.
TRAIN_STREAM, EVAL_STREAM, CROP_STREAM, COLLATOR_STREAM = 0, 1, 2, 3
# Conversations the packaged training template must render exactly like a tokenizer's template to stand in for it.
_PROBE_CONVERSATION = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
]


@dataclass
class DiffusionSFTConfig(SFTConfig):
    r"""
    `SFTConfig` for masked-diffusion SFT. TRL's dataset handling is unchanged (conversational data through the chat
    template, prompt-completion data with completion-only loss); the loss and the collator are LLaDA's. Conversational
    `messages` data is trained on the assistant turns only by default (`assistant_only_loss=None`).
    """

    mask_token_id: int | None = field(
        default=None, metadata={"help": "Mask token id; None reads `model.config.mask_token_id` (156895 for the 7B)."}
    )
    time_epsilon: float = field(
        default=TIME_EPSILON, metadata={"help": "Masking probability floor: t = (1 - eps) u + eps, weight 1/t."}
    )
    stratified_t: bool = field(
        default=False,
        metadata={
            "help": "Stratify t over the rows of an optimizer step ((u0 + i/N) mod 1: still unbiased, lower variance)."
        },
    )
    loss_normalization: str = field(
        default="answer_length",
        metadata={
            "help": "answer_length (LLaDA SFT: per row by its response length incl. EOS tail, then mean over rows), "
            "supervised_tokens (all response tokens), batch (rows), all_tokens (B x T); each over the whole "
            "optimizer step (all accumulated micro-batches, and all processes with average_tokens_across_devices)."
        },
    )
    eos_tail: bool = field(
        default=True,
        metadata={"help": "Right-pad responses with EOS that is attended and trained on (LLaDA's length control)."},
    )
    random_length_prob: float = field(
        default=0.0,
        metadata={
            "help": "Variable-length training (LLaDA-MoE): with this probability the batch of an optimizer step is "
            "cropped to a random width that keeps every prompt and at least one response token of every row."
        },
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "None (default): True for conversational `messages` data (only assistant turns are masked and "
            "scored), False otherwise. False on `messages` data trains on the whole conversation, prompts included."
        },
    )
    load_balance_coef: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss."})
    z_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the router z-loss."})
    router_aux_loss_coef: float | None = field(
        default=0.0,
        metadata={"help": "TRL's own aux-loss path; kept at 0.0 (the router losses above replace it)."},
    )

    def __post_init__(self):
        self._check_diffusion_fields()
        super().__post_init__()
        if self.packing or self.padding_free:
            raise ValueError(
                f"packing={self.packing}, padding_free={self.padding_free}: masked-diffusion SFT needs one example per "
                "row (bidirectional attention would mix packed documents, and each row needs its own EOS tail)"
            )
        refuse_router_aux_loss(self, "use load_balance_coef / z_loss_coef instead")

    def _check_diffusion_fields(self) -> None:
        """Types, ranges and finiteness of this class's own fields: `ValueError` naming the field, its value and what
        is accepted (before `SFTConfig.__post_init__`, so a bad value never reaches a comparison or the trainer)."""
        check_mask_token_id_field(self)
        check_number(self, "time_epsilon", lambda v: 0 < v < 1, "a finite float in (0, 1)")
        check_number(self, "random_length_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]")
        check_number(self, "load_balance_coef", lambda v: v >= 0, "a finite weight >= 0")
        check_number(self, "z_loss_coef", lambda v: v >= 0, "a finite weight >= 0")
        check_choice(self, "loss_normalization", NORMALIZATIONS)
        check_flag(self, "stratified_t")
        check_flag(self, "eos_tail")
        check_flag(self, "assistant_only_loss", optional=True)


def random_crop_width(labels: torch.Tensor, generator: torch.Generator) -> int:
    """A width drawn uniformly between the shortest one that keeps every prompt and one response token of every row
    of `labels` ([B, W], -100 off the response) and W (variable-length training)."""
    width = labels.shape[1]
    supervised = labels != -100
    first = torch.where(supervised.any(1), supervised.float().argmax(1), torch.full_like(labels[:, 0], width))
    shortest = min(int(first.max()) + 1, width)
    return int(torch.randint(shortest, width + 1, (), generator=generator))


@dataclass
class DataCollatorForDiffusionSFT:
    """Right-pads `input_ids` with EOS, attends to every position, and supervises the EOS tail of rows whose response
    reaches their end (labels padded with EOS there, -100 otherwise). With `random_length_prob`, crops a batch to a
    random width keeping every prompt and one response token (variable-length training); the draw is a function of
    `seed` and the batch's token ids, never of the global RNG. `DiffusionSFTTrainer` crops per optimizer step instead
    (`DiffusionSFTConfig.random_length_prob`), so its own collator never crops."""

    eos_token_id: int
    eos_tail: bool = True
    random_length_prob: float = 0.0
    seed: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), width), self.eos_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            row_labels = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = row_labels
            if self.eos_tail and len(ids) and row_labels[-1] != -100:
                labels[row, len(ids) :] = self.eos_token_id
        if self.random_length_prob:
            generator = example_generator(self.seed, [COLLATOR_STREAM], input_ids.flatten(), labels.flatten())
            if torch.rand((), generator=generator) < self.random_length_prob:
                width = random_crop_width(labels, generator)
                input_ids, labels = input_ids[:, :width], labels[:, :width]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}

    def extend(self, batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
        """A collated batch right-padded to `width` as if its longest row had been that long: EOS ids, attended, the
        labels extended with EOS where the row's EOS tail is supervised."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        extra = width - input_ids.shape[1]
        if extra <= 0:
            return batch
        tail = self.eos_tail & (labels[:, -1:] != -100)
        pad_labels = torch.where(tail, self.eos_token_id, -100).expand(-1, extra)
        extended = dict(batch)
        extended["input_ids"] = torch.cat(
            [input_ids, input_ids.new_full((input_ids.shape[0], extra), self.eos_token_id)], 1
        )
        extended["labels"] = torch.cat([labels, pad_labels.to(labels.dtype)], 1)
        attention = batch.get("attention_mask")
        if attention is not None:
            extended["attention_mask"] = torch.cat([attention, attention.new_ones(attention.shape[0], extra)], 1)
        return extended


def _conversational_messages(dataset) -> bool:
    """Whether a dataset (or dict of datasets) holds language-modelling conversations (`messages` / ShareGPT
    `conversations`), not prompt-completion pairs."""
    if dataset is None:
        return False
    if isinstance(dataset, dict):
        return any(_conversational_messages(part) for part in dataset.values())
    example = next(iter(dataset), None)
    if not isinstance(example, dict) or "prompt" in example:
        return False
    turns = example.get("messages", example.get("conversations"))
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict)


def _renders_like_training_template(tokenizer) -> bool:
    """Whether the packaged training template renders conversations exactly like `tokenizer`'s own template."""
    training = TRAINING_CHAT_TEMPLATE_PATH.read_text()
    try:
        for messages, prompt in ((_PROBE_CONVERSATION, False), (_PROBE_CONVERSATION[:4], True)):
            kwargs = dict(tokenize=False, add_generation_prompt=prompt)
            if tokenizer.apply_chat_template(messages, **kwargs) != tokenizer.apply_chat_template(
                messages, chat_template=training, **kwargs
            ):
                return False
    except Exception:  # a template that cannot render the probe is not the Ling one
        return False
    return True


def _checked_formatting_func(formatting_func, name: str):
    """`formatting_func` refusing (ValueError naming the row's values) a result that is not text to train on."""

    def checked(example):
        text = formatting_func(example)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{name}: formatting_func returned {shorten(text)} for the row {shorten(example)}; expected a "
                "non-empty string"
            )
        return text

    return checked


def _config_kwargs(args: DiffusionSFTConfig) -> dict:
    """The keywords `SFTTrainer` loads a model given by name with, as far as they concern its config."""
    init = args.model_init_kwargs or {}
    kwargs = {key: init[key] for key in ("revision", "token", "cache_dir") if key in init}
    return {"trust_remote_code": args.trust_remote_code, **kwargs}


class DiffusionSFTTrainer(ShardedCheckpoints, SFTTrainer):
    """`SFTTrainer` with the LLaDA masked-diffusion objective. Logs `diffusion/masked_accuracy`, `diffusion/nll`,
    `diffusion/mask_ratio`, `aux/load_balance` and `aux/z_loss` besides TRL's metrics, gathered over processes.

    Conversational `messages` data trains the assistant turns only (see the module docstring for multi-turn
    conversations). A tokenizer whose chat template has no `{% generation %}` markers but renders like LLaDA-MoE's
    (Ling) template is tokenized with the packaged training template (`TRAINING_CHAT_TEMPLATE_PATH`); any other
    template without markers, that TRL cannot patch either, is refused with a ValueError rather than trained on the
    prompts.

    Gradient accumulation: the loss of each micro-batch is its share of the optimizer step's loss (the normalisation
    denominator, `num_items_in_batch`, counts the whole step), the EOS tails of the accumulated micro-batches are
    padded to a common width, and masks are drawn per row position in the step, so k micro-batches of b rows give the
    update of one batch of k x b rows (MoE router losses are per micro-batch means averaged over the step).

    A model sharded with FSDP2 at load time (`DistributedConfig(fsdp_size=N)`) gets sharded step checkpoints (model and
    optimizer through torch.distributed.checkpoint) that `train(resume_from_checkpoint=...)` resumes
    (`trl_ext.sharded_checkpoints`).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's `num_items_in_batch`

    _tag_names = ["trl", "sft", "diffusion", "llada", "llada-moe"]
    _name = "Diffusion SFT"
    _paper = {
        "title": "Large Language Diffusion Models",
        "id": "2502.09992",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{nie2025llada,
                title   = {{Large Language Diffusion Models}},
                author  = {Shen Nie and others},
                year    = 2025,
                journal = {arXiv preprint arXiv:2502.09992},
            }"""),
    }

    def __init__(self, model, args: DiffusionSFTConfig | None = None, data_collator=None, **kwargs):
        if args is None or not isinstance(args, DiffusionSFTConfig):
            raise ValueError(f"args must be a DiffusionSFTConfig, got {type(args).__name__}")
        check_containers(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        config = getattr(model, "config", None)
        if config is None and isinstance(model, str):
            config = AutoConfig.from_pretrained(model, **_config_kwargs(args))
        # Known before dataset preparation, which refuses rows holding the mask token.
        self.mask_token_id = args.mask_token_id
        if self.mask_token_id is None:
            self.mask_token_id = getattr(config, "mask_token_id", None)
        if self.mask_token_id is not None:
            check_mask_token_id(self.mask_token_id, config=config, tokenizer=kwargs.get("processing_class"))
        saved = router_settings(config)
        processing_class = kwargs.get("processing_class")
        eos = eos_token_id(processing_class, config)
        if data_collator is None:
            if eos is None:
                raise ValueError("DiffusionSFTTrainer needs an eos_token_id (tokenizer or model config) for padding")
            data_collator = DataCollatorForDiffusionSFT(eos, args.eos_tail)
        elif args.random_length_prob and getattr(data_collator, "random_length_prob", 0):
            raise ValueError(
                f"random_length_prob={args.random_length_prob} and a data_collator with random_length_prob="
                f"{data_collator.random_length_prob}: crop once, in the config (per optimizer step)"
            )
        if args.assistant_only_loss is None:
            # A copy: the caller's config keeps its "decide from the data" default for other datasets.
            args = copy.copy(args)
            args.assistant_only_loss = any(
                _conversational_messages(kwargs.get(name)) for name in ("train_dataset", "eval_dataset")
            )
        training_template = self._training_template(args, processing_class)
        if training_template is not None:
            # Tokenize with the marked template; the tokenizer keeps (and saves) its own.
            original, processing_class.chat_template = processing_class.chat_template, training_template
        try:
            super().__init__(model, args=args, data_collator=data_collator, **kwargs)
        except ValueError as error:
            if "not training-compatible" not in str(error):
                raise
            raise ValueError(
                "assistant_only_loss: the chat template has no {% generation %} markers, so the assistant turns "
                "cannot be told from the prompt (training on prompts is refused). Pass chat_template_path= a template "
                "with markers (trl_ext.TRAINING_CHAT_TEMPLATE_PATH for LLaDA-MoE's), use prompt-completion data, "
                "or set assistant_only_loss=False to train on the whole conversation"
            ) from error
        finally:
            if training_template is not None:
                processing_class.chat_template = original
        if training_template is not None:
            self.chat_template = training_template  # datasets prepared later (evaluate) use it too
        # TRL writes its aux-loss settings into the model config; keep the model's own (they are saved with it).
        text_config = self.model.config
        restore_router_settings(text_config, saved)
        check_mask_in_vocab(self.mask_token_id, text_config, self.processing_class, "DiffusionSFTConfig.mask_token_id")
        if self._skip_prepare_dataset:  # tokenized by the caller: only the token ids can be checked
            self.train_dataset = self._check_tokenized(self.train_dataset, "train_dataset")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    key: self._check_tokenized(data, dataset_name("eval_dataset", key))
                    for key, data in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._check_tokenized(self.eval_dataset, "eval_dataset")

    def _check_tokenized(self, dataset, name: str):
        return check_prepared_tokens(dataset, dataset, name, ["input_ids"], self.mask_token_id)

    @staticmethod
    def _training_template(args: DiffusionSFTConfig, processing_class) -> str | None:
        """The packaged training template when assistant-only loss needs markers the tokenizer's Ling-style template
        lacks; None when TRL handles the template (markers present, `chat_template_path`, or a template TRL knows)."""
        if not args.assistant_only_loss or args.chat_template_path is not None or processing_class is None:
            return None
        template = getattr(processing_class, "chat_template", None)
        if template is None:
            raise ValueError(
                "assistant_only_loss: the tokenizer has no chat_template to render the conversations; set "
                "chat_template_path= (trl_ext.TRAINING_CHAT_TEMPLATE_PATH for LLaDA-MoE) or use prompt-completion data"
            )
        if has_generation_markers(template) or not _renders_like_training_template(processing_class):
            return None
        return TRAINING_CHAT_TEMPLATE_PATH.read_text()

    # ---- dataset checks ----

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name_):
        """TRL's preparation, after a one-pass check of the rows (a `ValueError` naming the row and column of a None,
        a wrong type, an empty response, a conversation without an assistant turn, conversational and plain rows
        mixed, the mask token) and followed by a scan of the token ids for the mask id."""
        name = prepared_dataset_name(dataset_name_)
        check_container(dataset, name)
        if formatting_func is not None:
            formatting_func = _checked_formatting_func(formatting_func, name)
        else:
            dataset = check_dataset(
                dataset,
                name,
                self._data_columns(dataset, name, args),
                mask_token_id=self.mask_token_id,
                tokenizer=processing_class,
                require_assistant=bool(args.assistant_only_loss),
            )
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name_)
        check_not_emptied(dataset, prepared, name, args.max_length, "the prompt")
        if self.mask_token_id is None:
            return prepared

        def part(example, column, position):
            labels = example.get("labels")
            if labels is None or position >= len(labels):
                return "text"
            return "prompt" if labels[position] == -100 else "response"

        return check_prepared_tokens(dataset, prepared, name, ["input_ids"], self.mask_token_id, part)

    @staticmethod
    def _data_columns(dataset, name: str, args: DiffusionSFTConfig) -> list[Column]:
        """The columns TRL reads for this dataset's format, with their roles; a ValueError when none fits."""
        present = column_names(dataset)
        if "input_ids" in present:
            return [Column("input_ids", TOKEN_IDS)]
        if "prompt" in present or "completion" in present:
            for needed in ("prompt", "completion"):
                if needed not in present:
                    raise ValueError(
                        f"{name} has columns {present}: a prompt-completion dataset needs both 'prompt' and "
                        f"'completion' (missing {needed!r})"
                    )
            return [Column("prompt", PROMPT), Column("completion", RESPONSE)]
        for conversation in ("messages", "conversations"):
            if conversation in present:
                return [Column(conversation, CONVERSATION)]
        if args.dataset_text_field in present:
            return [Column(args.dataset_text_field, RESPONSE)]
        raise ValueError(
            f"{name} has columns {present}; expected a {args.dataset_text_field!r} column (dataset_text_field), a "
            "'messages' column (conversations), 'prompt' and 'completion' columns, or tokenized 'input_ids'"
        )

    # ---- the optimizer step's batch ----

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step, padded to a common width (so each row's EOS tail is the one a
        single batch of them would give), cropped together with `random_length_prob`, each row tagged with its
        position in the step; and `num_items_in_batch`, the step's normalisation denominator."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)  # the count is ours
        if not batches:
            return batches, None
        if isinstance(self.data_collator, DataCollatorForDiffusionSFT):
            width = max(batch["input_ids"].shape[1] for batch in batches)
            batches = [self.data_collator.extend(batch, width) for batch in batches]
            generator = self._step_generator(CROP_STREAM)
            if self.args.random_length_prob and torch.rand((), generator=generator) < self.args.random_length_prob:
                labels = torch.cat([batch["labels"] for batch in batches]).cpu()
                width = random_crop_width(labels, generator)
                batches = [{key: value[:, :width] for key, value in batch.items()} for batch in batches]
        rows = sum(batch["input_ids"].shape[0] for batch in batches)
        offset = 0
        for batch in batches:
            size = batch["input_ids"].shape[0]
            batch["sample_index"] = torch.arange(offset, offset + size)
            batch["rows_in_step"] = rows
            offset += size
        items = sum(self._count_items(batch["labels"], batch.get("attention_mask")) for batch in batches)
        items = torch.as_tensor(items, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            items = self.accelerator.gather(items).sum()
        return batches, items

    def _count_items(self, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The normalisation denominator of a batch: rows, supervised tokens or attended tokens."""
        scheme = self.args.loss_normalization
        if scheme in ("answer_length", "batch"):
            return torch.tensor(labels.shape[0])
        if scheme == "supervised_tokens":
            return (labels != -100).sum().cpu()
        return (attention_mask.sum() if attention_mask is not None else torch.tensor(labels.numel())).cpu()

    def _step_generator(self, stream: int, *key) -> torch.Generator:
        return example_generator(self.args.seed, [stream, self.state.global_step, *key])

    def _noise(self, inputs, targets: torch.Tensor, supervised: torch.Tensor):
        """Per-row noise levels t and masks. Training rows draw from (seed, step, position in the step's global batch);
        evaluation rows from (seed, their token ids), so an evaluation is reproducible whatever the batching."""
        args: DiffusionSFTConfig = self.args
        rows = targets.shape[0]
        if self.model.training:
            index = inputs.get("sample_index")
            index = range(rows) if index is None else index.tolist()
            local_total = int(inputs.get("rows_in_step", rows))
            # Process p holds rows [p*n, (p+1)*n) of the step's global batch (the data loader's shards, same sizes).
            index = [args.process_index * local_total + i for i in index]
            total = local_total * args.world_size
            generators = [self._step_generator(TRAIN_STREAM, i) for i in index]
            offset = self._step_generator(TRAIN_STREAM, -1)
        else:
            index, total = range(rows), rows
            cpu_targets, cpu_supervised = targets.cpu(), supervised.cpu()
            generators = [
                example_generator(args.seed, [EVAL_STREAM], cpu_targets[r], cpu_supervised[r].long()) for r in index
            ]
            offset = example_generator(args.seed, [EVAL_STREAM], cpu_targets.flatten())
        u = torch.stack([torch.rand((), generator=generator) for generator in generators])
        if args.stratified_t:
            u = (torch.rand((), generator=offset) + torch.tensor(list(index)) / total) % 1.0
        noise = ((1 - args.time_epsilon) * u + args.time_epsilon).to(targets.device)
        noisy, masked = zip(
            *(
                bernoulli_mask(targets[r : r + 1], supervised[r : r + 1], noise[r : r + 1], self.mask_token_id, g)
                for r, g in enumerate(generators)
            )
        )
        return noise, torch.cat(noisy), torch.cat(masked)

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the LLaDA SFT loss: Σ rows (1/t) x masked cross-entropy (per answer length with
        `answer_length`) / `num_items_in_batch` (the optimizer step's rows, supervised or attended tokens, by
        `loss_normalization`), plus the weighted router losses. Without `num_items_in_batch` (evaluation, direct
        calls) the micro-batch is the whole batch."""
        mode = "train" if self.model.training else "eval"
        args: DiffusionSFTConfig = self.args
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        supervised = labels != -100
        targets = torch.where(supervised, labels, input_ids)
        noise, noisy, masked = self._noise(inputs, targets, supervised)
        router_losses = args.load_balance_coef > 0 or args.z_loss_coef > 0
        outputs = model(
            input_ids=noisy,
            attention_mask=attention_mask,
            logits_to_keep=masked,
            output_router_logits=router_losses,
            use_cache=False,
        )
        # Logits of the masked positions only ([N masked, V]); the per-row 1/t-weighted masked cross-entropy.
        row_nll = masked_token_nll(outputs.logits, targets, masked)
        row_loss = row_nll / noise
        if args.loss_normalization == "answer_length":
            row_loss = row_loss / supervised.sum(-1).clamp(min=1)
        items = self._count_items(labels, attention_mask) if num_items_in_batch is None else num_items_in_batch
        loss = row_loss.sum() / torch.as_tensor(items, device=row_loss.device).clamp(min=1)
        loss = step_share_of_loss(self, loss, outputs, router_losses, num_items_in_batch)

        with torch.no_grad():
            metrics = self._metrics[mode]
            gather = self.accelerator.gather_for_metrics
            count = gather(masked.sum()).sum().clamp(min=1)
            correct = (outputs.logits.argmax(-1) == targets[masked]).sum()
            metrics["diffusion/masked_accuracy"].append((gather(correct).sum() / count).item())
            metrics["diffusion/nll"].append((gather(row_nll.detach().sum()).sum() / count).item())
            ratio = gather(masked.sum()).sum() / gather(supervised.sum()).sum().clamp(min=1)
            metrics["diffusion/mask_ratio"].append(ratio.item())
            if router_losses:
                metrics["aux/load_balance"].append(gather(outputs.aux_loss.detach()).mean().item())
                metrics["aux/z_loss"].append(gather(outputs.z_loss.detach()).mean().item())
            if mode == "train":
                tokens = attention_mask.sum() if attention_mask is not None else torch.tensor(input_ids.numel())
                self._total_train_tokens += int(gather(tokens.to(input_ids.device)).sum()) // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
