"""scripts/hf_architecture_configs.txt, the configs the architecture sweeps needed, stays usable: each line parses
(``check_hf_architectures.py``'s own parser, shell quoting and Python literals) into a config transformers accepts
at the check's size, for a causal LM class it has. Building the models and the compiled decode are the script's
job, outside the suite (minutes)."""

import importlib.util
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_hf_architectures", ROOT / "scripts" / "check_hf_architectures.py")
check_hf_architectures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_hf_architectures)
ARCHITECTURES = check_hf_architectures.parse([f"@{ROOT / 'scripts' / 'hf_architecture_configs.txt'}"])


def test_the_file_names_every_architecture_once():
    names = [name for name, _ in ARCHITECTURES]
    assert len(names) == len(set(names)) and len(names) >= 19


@pytest.mark.parametrize("name, settings", ARCHITECTURES, ids=[name for name, _ in ARCHITECTURES])
def test_each_line_builds_a_config_transformers_accepts(name, settings):
    """The config's validators pass (they raise on sizes that do not fit together) and the class exists."""
    config, model_class = check_hf_architectures.configure(name, settings)
    assert config.hidden_size == check_hf_architectures.SIZE["hidden_size"]
    assert issubclass(model_class, transformers.PreTrainedModel)
