from dyllm_compile import demo


def test_demo_runs_and_modes_agree(capsys):
    results = demo.main(["--size", "tiny", "--modes", "eager,dyllm", "--prompt-length", "8", "--gen-length", "8",
                         "--steps", "4", "--block-length", "8"])
    out = capsys.readouterr().out
    assert [r.name for r in results] == ["eager", "dyllm"]
    assert all(r.result.stats.tokens_per_second > 0 for r in results)
    assert "tokens/s" in out and "dyllm" in out
    assert (results[0].result.tokens == results[1].result.tokens).all()
