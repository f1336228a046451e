from dyllm_compile import demo


def test_demo_random_model_modes_agree(capsys):
    results = demo.main(["--model", "llada", "--size", "tiny", "--modes", "eager,dyllm", "--batch", "1",
                         "--prompt-length", "8", "--gen-length", "8", "--steps", "4", "--block-length", "8"])
    out = capsys.readouterr().out
    assert [r.name for r in results] == ["eager", "dyllm"]
    assert all(r.result.stats.tokens_per_second > 0 for r in results)
    assert "tokens/s" in out and "dyllm" in out
    assert (results[0].result.tokens == results[1].result.tokens).all()


def test_demo_default_model_prints_answers(capsys):
    # Threshold 1 makes dyllm compute densely: its answers must be eager's, and they are printed per problem.
    results = demo.main(["--modes", "eager,dyllm", "--batch", "5", "--threshold", "1.0", "--lowering", "aot_eager"])
    out = capsys.readouterr().out
    assert (results[0].result.tokens == results[1].result.tokens).all()
    assert "trained in-repo model" in out and "answers (dyllm):" in out
    answer_lines, note = out.split("answers (dyllm):")[1].strip().split("\nnote: ")
    assert [line.split()[0] for line in answer_lines.splitlines()] == ["copy", "reverse", "sort", "add", "recall"]
    assert note.startswith("this model is small")  # and where the speedup shows
