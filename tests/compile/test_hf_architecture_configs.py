"""scripts/hf_architectures.txt, every architecture the sweeps run with the configs they need, stays usable: each
line parses (``check_hf_architectures.py``'s own parser, shell quoting and Python literals) into a config transformers
accepts at the check's size, for a masked or causal LM class it has. Building the models and the compiled decode are
the script's job, outside the suite (half an hour for the file)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path):
    """A script as a module (``scripts/`` and ``benchmarks/`` are folders of scripts, not packages)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (a dataclass needs it there)
    spec.loader.exec_module(module)
    return module


check_hf_architectures = _load(ROOT / "scripts" / "check_hf_architectures.py")
ARCHITECTURES, _, _ = check_hf_architectures.parse([f"@{ROOT / 'scripts' / 'hf_architectures.txt'}"])


def test_the_file_names_every_architecture_once():
    names = [name for name, _ in ARCHITECTURES]
    assert len(names) == len(set(names)) and len(names) >= 140


@pytest.mark.parametrize("name, settings", ARCHITECTURES, ids=[name for name, _ in ARCHITECTURES])
def test_each_line_builds_a_config_transformers_accepts(name, settings):
    """The config's validators pass (they raise on sizes that do not fit together) and the class exists."""
    config, model_class = check_hf_architectures.configure(name, settings)
    assert config.hidden_size == check_hf_architectures.SIZE["hidden_size"]
    assert issubclass(model_class, transformers.PreTrainedModel)


def test_a_run_s_csv_makes_the_docs_table(tmp_path):
    """--csv's rows make docs/architectures.md's table (benchmarks/report.py): the first reason that is a finding
    (not an embedding's "no matmul work to save") and how many there are; a skipped model's error."""
    result = check_hf_architectures.Result
    results = [result("Llama", "equal", 1.8e-7, "equal", 7, 88.4, "", [
        "layer 0: light region ending at 'inputs_embeds': no matmul work to save",
        "layer 1: ffn region computed densely (its output has no batch-first token axis; a | b)",
        "'conv1d' x2: token-mixing (no row-wise rule for op 'conv1d'); computed densely"], "LlamaForCausalLM"),
        result("Funnel", "skipped", detail="the model fails eagerly: NotImplementedError: block_sizes")]
    path = tmp_path / "architectures.csv"
    check_hf_architectures._write_csv(str(path), results)
    lines = _load(ROOT / "benchmarks" / "report.py").architectures_table(str(path)).splitlines()
    assert lines[0].startswith(f"transformers {transformers.__version__}, torch ")
    assert "threshold 1, aot_eager lowering," in lines[0]
    assert lines[-2:] == [
        "| Llama | LlamaForCausalLM | equal | 1.8e-07 | equal | 88% | layer 1: ffn region computed densely (its "
        "output has no batch-first token axis; a / b) (2) |",
        "| Funnel | - | skipped | - | - | - | the model fails eagerly: NotImplementedError: block_sizes |"]


def test_the_csv_names_the_lowering(tmp_path):
    """A run with ``--lowering inductor`` says so in its rows and in the table made from them."""
    path = tmp_path / "architectures.csv"
    check_hf_architectures._write_csv(str(path), [check_hf_architectures.Result("Llama", "equal")], "inductor")
    assert "threshold 1, inductor lowering," in _load(ROOT / "benchmarks" / "report.py").architectures_table(str(path))
    assert check_hf_architectures.parse(["Llama", "--lowering", "inductor"])[2] == "inductor"


def test_the_inductor_subset_copies_its_lines_from_the_full_list():
    """scripts/hf_architectures_inductor.txt: every line as the full list has it (no config drifting apart)."""
    def lines(name):
        text = (ROOT / "scripts" / name).read_text().splitlines()
        return [line for line in text if line.strip() and not line.startswith("#")]

    subset = lines("hf_architectures_inductor.txt")
    assert len(subset) >= 30 and set(subset) <= set(lines("hf_architectures.txt"))
