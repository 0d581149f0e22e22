"""transformers' own common model and config tests (`ModelTesterMixin`, `ConfigTester`) on the LLaDA-MoE classes.

The transformers wheel ships no tests, but the source distribution of the installed version on PyPI holds
`tests/test_modeling_common.py` and `tests/test_configuration_common.py`. The first run fetches it with pip into a
cache outside the repository (`LLADA_MOE_TEST_CACHE`, default `~/.cache/llada_moe`) and imports the two files from
there; nothing of it is copied into this repository. The sdist leaves out three helper modules the two files import
(`tests/exporters`, `tests/generation`, `tests/utils`); they are replaced by the stand-ins below, so the export and
`generate` test mixins do not run (our `generate` is the diffusion sampler, tested in test_generation.py). Their one
test dependency, `parameterized`, comes with the `dev` extra. When the package index cannot be reached the module
fails (a dev dependency missing is a broken run, not a skip). The whole mixin runs: ~25 s on 2 CPU cores once cached
(the first fetch adds ~35 s).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM, LLaDAMoEModel


VERSION = transformers.__version__
PACKAGE = "hf_transformers_tests"  # not `tests`: that name is this repository's test folder
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")
# Stand-ins for the helper modules the sdist leaves out (written here, not copied): the two mixins they provide are
# not run, and `config_common_kwargs` is a value for each common `PreTrainedConfig` argument that differs from its
# default (what `ConfigTester.check_config_arguments_init` sets and reads back).
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False,\n"
        "    'output_hidden_states': True,\n"
        "    'output_attentions': True,\n"
        "    'dtype': 'float16',  # ConfigTester compares it with torch.float16\n"
        "    'chunk_size_feed_forward': 3,\n"
        "    'architectures': ['LLaDAMoEModelLM'],\n"
        "    'id2label': {0: 'kept', 1: 'masked'},\n"
        "    'label2id': {'kept': '0', 'masked': '1'},\n"
        "    'problem_type': 'single_label_classification',\n"
        "}\n"
    ),
}


def _cache_dir() -> Path:
    root = Path(os.environ.get("LLADA_MOE_TEST_CACHE", Path.home() / ".cache" / "llada_moe"))
    return root / f"transformers-{VERSION}-common-tests"


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args, "--no-deps", "--disable-pip-version-check", "-q"]
    result = subprocess.run([*command, "--timeout", "30", "--retries", "2"], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(
            f"could not fetch transformers' common tests from the package index (`pip {' '.join(args)}` failed: "
            f"{result.stderr.strip()[-400:]})"
        )


def _prepare_common_tests() -> Path:
    """The cache folder holding the `hf_transformers_tests` package, fetched on first use."""
    cache = _cache_dir()
    if (cache / "complete").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as work:
        staging, package = Path(work) / "staging", Path(work) / "staging" / PACKAGE
        _pip("download", f"transformers=={VERSION}", "--no-binary", ":all:", "-d", work)
        (sdist,) = Path(work).glob("transformers-*.tar.gz")
        package.mkdir(parents=True)
        with tarfile.open(sdist) as archive:
            for name in COMMON_FILES:
                member = archive.extractfile(f"transformers-{VERSION}/tests/{name}")
                (package / name).write_bytes(member.read())
        (package / "__init__.py").touch()
        for relative, text in STAND_INS.items():
            path = package / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        (staging / "complete").touch()
        shutil.rmtree(cache, ignore_errors=True)  # a copy left incomplete by an interrupted run
        try:
            staging.rename(cache)
        except OSError:
            if not (cache / "complete").is_file():  # not a concurrent run that finished first
                raise
    return cache


def _import_common():
    # The package is loaded from its folder by spec (its modules import each other relatively), not put on sys.path.
    cache = _prepare_common_tests()
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, cache / PACKAGE / "__init__.py")
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[PACKAGE])
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling.ModelTesterMixin, modeling.ids_tensor, configuration.ConfigTester


ModelTesterMixin, ids_tensor, ConfigTester = _import_common()


class LLaDAMoEModelTester:
    """Builds the tiny config and inputs the common tests draw (one dense and one MoE layer, GQA, shared expert)."""

    def __init__(self, parent, batch_size: int = 2, seq_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2

    def get_config(self) -> LLaDAMoEConfig:
        return LLaDAMoEConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            dense_intermediate_size=37,
            expert_intermediate_size=16,
            shared_expert_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_layer_freq=[1, 0],
            max_position_embeddings=64,
            # An explicit factor lets the partial-rotation test run (it rotates a fraction of each head itself).
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0},
            pad_token_id=0,
            eos_token_id=1,
            mask_token_id=self.vocab_size - 1,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[LLaDAMoEConfig, dict[str, torch.Tensor]]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # one left-padded row
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class LLaDAMoEModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LLaDAMoEModel, LLaDAMoEForMaskedLM)
    # `generate` is the masked-diffusion sampler (a canvas of mask tokens refined in blocks), not the autoregressive
    # loop `GenerationTesterMixin` checks token by token; test_generation.py covers it (and test_model.py the output
    # class the router-logits test reads from generative heads).
    all_generative_model_classes = ()
    # Run `_init_weights` coverage too (the mixin skips it for models without a 2023+ copyright line).
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        # The mixin picks the base model (RoPE tests, no training loss) and the masked-LM head (labels) by the class
        # names transformers' own models list in its Auto mappings: list ours there while these tests run.
        cls._names = [
            mock.patch.dict(MODEL_MAPPING_NAMES, {LLaDAMoEConfig.model_type: LLaDAMoEModel.__name__}),
            mock.patch.dict(MODEL_FOR_MASKED_LM_MAPPING_NAMES, {LLaDAMoEConfig.model_type: "LLaDAMoEForMaskedLM"}),
        ]
        for patch in cls._names:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in cls._names:
            patch.stop()

    def setUp(self):
        self.model_tester = LLaDAMoEModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LLaDAMoEConfig, hidden_size=32, vocab_size=99)

    def test_config(self):
        self.config_tester.run_common_tests()
