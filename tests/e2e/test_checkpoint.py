import json
import os

import pytest
import torch

from dyllm_compile.models import dream_like, load_pretrained
from dyllm_compile.models.hf import save_pretrained


def test_remote_code_checkpoint_round_trip(tmp_path):
    model = dream_like("tiny")
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("DyllmLMModel")
    modeling_files = [f for f in os.listdir(tmp_path) if f.endswith(".py")]
    assert modeling_files, "a remote-code checkpoint ships its modeling source"
    loaded = load_pretrained(tmp_path)
    assert type(loaded).__module__.startswith("transformers_modules")  # loaded from the checkpoint's code
    x = torch.randint(0, 127, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x), rtol=0, atol=0)


def test_load_pretrained_never_goes_to_a_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(tmp_path / "GSAI-ML/LLaDA-8B-Instruct")
