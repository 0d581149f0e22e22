"""A saved folder carries its code: it loads with trust_remote_code where this package cannot be imported."""

import json
import os
import textwrap

import pytest
import torch
from conftest import run_python, tiny_model
from transformers import AutoModel, AutoModelForMaskedLM, GenerationConfig

from modeling_llada_moe import LLaDAMoEForMaskedLM, LLaDAMoEModel


MODEL_FILES = {
    "modeling_llada_moe.py",
    "configuration_llada_moe.py",
    "checkpoint_conversion.py",
    "bnb_layout.py",
    "expert_cache.py",
    "fused_moe.py",
    "moe_backends.py",
    "validators.py",
    "forward_process.py",
    "generation_utils.py",
    "generation_config.py",
    "generation_cache.py",
    "generation_inputs.py",
    "unmasking.py",
}


def test_saved_folder_has_auto_map_code_generation_config_and_card(tmp_path):
    model = tiny_model(moe_layer_freq=[0, 1])
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert MODEL_FILES | {"config.json", "generation_config.json", "README.md", "model.safetensors"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada_moe"
    # The official class name, as in the official checkpoints: tools keyed on it (GGUF converters) recognise the folder.
    assert config["architectures"] == ["LLaDAMoEModelLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llada_moe.LLaDAMoEConfig",
        "AutoModel": "modeling_llada_moe.LLaDAMoEForMaskedLM",
        "AutoModelForMaskedLM": "modeling_llada_moe.LLaDAMoEForMaskedLM",
    }
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert (generation.eos_token_id, generation.pad_token_id, generation.mask_token_id) == (120, 120, 126)
    card = (tmp_path / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| experts (top-k) | 8 (2) |" in card
    assert "| MoE layers | 1 of 2 |" in card


@pytest.mark.parametrize("saved_name", ["LLaDAMoEModelLM", "LLaDAMoEForMaskedLM"])
def test_folders_naming_either_class_load_with_every_entry_point(tmp_path, saved_name):
    # New folders say `LLaDAMoEModelLM`; folders saved before (and fine-tunes of them) say `LLaDAMoEForMaskedLM`.
    model = tiny_model(seed=2)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "architectures": [saved_name]}))
    x = torch.randint(0, 120, (1, 9))
    with torch.no_grad():
        expected = model(x).logits
        for auto_class in (LLaDAMoEForMaskedLM, AutoModel, AutoModelForMaskedLM):
            loaded = auto_class.from_pretrained(tmp_path).eval()
            assert type(loaded) is LLaDAMoEForMaskedLM and loaded.config.architectures == [saved_name]
            assert torch.equal(loaded(x).logits, expected)
    # Saving again writes the official name, whichever name the folder had.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["LLaDAMoEModelLM"]
    assert loaded.config.to_dict()["architectures"] == ["LLaDAMoEModelLM"]


def test_base_model_folder_maps_auto_model_to_the_trunk(tmp_path):
    torch.manual_seed(0)
    LLaDAMoEModel(tiny_model().config).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_llada_moe.LLaDAMoEModel"
    assert config["architectures"] == ["LLaDAMoEModel"]  # the official trunk class has the same name


REMOTE_LOAD = textwrap.dedent(
    """
    import json
    import sys
    sys.modules["modeling_llada_moe"] = None  # make `import modeling_llada_moe` fail: the package is hidden
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM

    folder, expected_path = sys.argv[1], sys.argv[2]
    expected = torch.load(expected_path, weights_only=True)
    assert json.load(open(folder + "/config.json"))["architectures"] == ["LLaDAMoEModelLM"]
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).__name__ == "LLaDAMoEForMaskedLM"
        with torch.no_grad():
            logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        assert type(model.generation_config).__name__ == "DiffusionGenerationConfig"
        generated = model.diffusion_generate(
            expected["input_ids"], attention_mask=expected["attention_mask"], max_new_tokens=8, block_length=4
        )
        assert torch.equal(generated, expected["generated"]), generated
        assert torch.equal(model.generate(expected["input_ids"][1:], max_new_tokens=8, block_length=4),
                           expected["generated"][1:])
    print("remote-code load OK")
    """
)


def test_remote_code_load_in_a_fresh_process_without_the_package(tmp_path):
    model = tiny_model(seed=4, moe_layer_freq=[1, 0], shared_expert_intermediate_size=16)
    folder = tmp_path / "hub_folder"
    model.save_pretrained(folder)
    input_ids = torch.randint(0, 120, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    generated = model.diffusion_generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, block_length=4)
    expected = {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits, "generated": generated}
    torch.save(expected, tmp_path / "expected.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    assert "remote-code load OK" in run_python(REMOTE_LOAD, folder, tmp_path / "expected.pt", cwd=tmp_path, env=env)


def test_remote_code_folder_saves_again_with_its_code(tmp_path):
    # A model loaded through trust_remote_code must itself save a complete folder (e.g. after fine-tuning).
    tiny_model().save_pretrained(tmp_path / "first")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    script = (
        "import sys; sys.modules['modeling_llada_moe'] = None\n"
        "from transformers import AutoModel\n"
        "AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).save_pretrained(sys.argv[2])\n"
    )
    run_python(script, tmp_path / "first", tmp_path / "second", cwd=tmp_path, env=env)
    assert MODEL_FILES <= set(os.listdir(tmp_path / "second"))
    # The folder's own configuration code writes the official class name too.
    assert json.loads((tmp_path / "second" / "config.json").read_text())["architectures"] == ["LLaDAMoEModelLM"]
    first = LLaDAMoEForMaskedLM.from_pretrained(tmp_path / "first")
    second = LLaDAMoEForMaskedLM.from_pretrained(tmp_path / "second")
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key
