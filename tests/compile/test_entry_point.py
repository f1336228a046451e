"""`torch.compile(model, backend="dyllm")` must work in a process that never imports dyllm_compile."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    assert "dyllm_compile" not in sys.modules
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager"})(x)
    # Dynamo resolved the name through the entry point, which imported the backend lazily.
    assert "dyllm_compile.backend" in sys.modules
    torch.testing.assert_close(got, expected)
    print("OK")
    """
)


def test_backend_resolves_by_entry_point_without_import():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
