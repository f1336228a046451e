import pytest
import torch

from dyllm_compile.generate import dream_generate, generate
from dyllm_compile.models import llada_like
from dyllm_compile.models.default import load_default_model

MASK = 127


class TargetModel:
    """Stub LM: logits strongly favour ``target_fn(position)``; records every input it sees."""

    def __init__(self, vocab=128, strength=20.0, target_fn=lambda pos: pos % 100):
        self.vocab, self.strength, self.target_fn = vocab, strength, target_fn
        self.seen = []

    def __call__(self, x, attention_mask=None):
        self.seen.append(x.clone())
        pos = torch.arange(x.shape[1])
        logits = torch.zeros(*x.shape, self.vocab)
        logits[:, pos, self.target_fn(pos)] = self.strength
        return logits


def _prompt(batch=2, length=6, seed=0):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_commits_exactly_gen_length_and_keeps_prompt(tiny_llada):
    prompt = _prompt()
    out = generate(tiny_llada, prompt, mask_token_id=MASK, gen_length=16, steps=8, block_length=8)
    assert out.tokens.shape == (2, 6 + 16)
    assert torch.equal(out.tokens[:, :6], prompt)
    assert not (out.tokens == MASK).any()
    assert out.stats.steps == 8 and out.stats.forward_calls == 8 and out.stats.tokens_generated == 32


def test_deterministic_with_seed(tiny_llada):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(tiny_llada, _prompt(), mask_token_id=MASK, gen_length=8, steps=8, temperature=1.0,
                        generator=g).tokens

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_blocks_decoded_left_to_right(tiny_llada):
    seen = []

    def recording(x):
        seen.append(x.clone())
        return tiny_llada(x)

    generate(recording, _prompt(length=4), mask_token_id=MASK, gen_length=24, steps=12, block_length=8)
    for x in seen:
        gen = (x[:, 4:] != MASK).view(2, 3, 8)  # [batch, block, position]
        started = gen.any(dim=2)
        complete = gen.all(dim=2)
        for b in range(1, 3):
            # A later block may only have committed tokens once every earlier block is complete.
            assert not (started[:, b] & ~complete[:, b - 1]).any()
    assert len(seen) == 12


def test_uniform_schedule_commits_evenly():
    model = TargetModel()
    out = generate(model, _prompt(), mask_token_id=MASK, gen_length=10, steps=4, block_length=10)
    committed = [int((x[0] != MASK).sum()) - 6 for x in model.seen] + [int((out.tokens[0] != MASK).sum()) - 6]
    assert [b - a for a, b in zip(committed, committed[1:])] == [3, 3, 2, 2]


def test_dream_shift_applied():
    model = TargetModel(target_fn=lambda pos: pos + 10)
    out = dream_generate(model, _prompt(length=5), mask_token_id=MASK, gen_length=8, steps=8)
    expected = torch.arange(5, 13) - 1 + 10  # position i takes the logits of position i - 1
    assert torch.equal(out.generated, expected.expand(2, 8))
    plain = generate(TargetModel(target_fn=lambda pos: pos + 10), _prompt(length=5), mask_token_id=MASK,
                     gen_length=8, steps=8)
    assert torch.equal(plain.generated, (torch.arange(5, 13) + 10).expand(2, 8))


def test_threshold_decoding_takes_fewer_steps_on_confident_model():
    out = generate(TargetModel(), _prompt(), mask_token_id=MASK, gen_length=32, block_length=8,
                   confidence_threshold=0.9)
    assert out.stats.steps == 4  # one step per block: every token is above the threshold
    assert not (out.tokens == MASK).any()


def test_threshold_decoding_commits_at_least_one_per_step():
    out = generate(TargetModel(strength=0.0), _prompt(), mask_token_id=MASK, gen_length=8, confidence_threshold=0.9)
    assert out.stats.steps == 8
    assert not (out.tokens == MASK).any()


def test_classifier_free_guidance_combines_logits():
    cond_logits = torch.tensor([0.0, 1.0, 1.1, 0.0])
    uncond_logits = torch.tensor([0.0, 0.0, 2.0, 0.0])
    calls = []

    def model(x):
        calls.append(x.clone())
        half = x.shape[0] // 2
        assert (x[half:, :3] == MASK).all() and (x[:half, :3] != MASK).all()
        logits = torch.empty(*x.shape, 128).fill_(-10.0)
        logits[:half, :, :4] = cond_logits
        logits[half:, :, :4] = uncond_logits
        return logits

    prompt = torch.tensor([[5, 6, 7]])
    out = generate(model, prompt, mask_token_id=MASK, gen_length=4, steps=4, cfg_scale=1.0)
    assert all(c.shape[0] == 2 for c in calls)
    assert (out.generated == 1).all()  # 2 * cond - uncond favours token 1; cond alone favours token 2


def test_padded_batch_equals_each_prompt_alone():
    model = llada_like("tiny", init_std=0.2).double()
    prompts = [torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 7)]
    kwargs = dict(mask_token_id=MASK, gen_length=16, steps=8, block_length=8)
    batched = generate(model, prompts, **kwargs)
    assert batched.prompt_length == 9
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], **kwargs)
        assert torch.equal(batched.generated[i], alone.generated[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gen_length=10, block_length=4), "multiple of block_length"),
        (dict(gen_length=16, block_length=8, steps=5), "multiple of the number of blocks"),
        (dict(remasking="greedy"), "remasking must be one of"),
        (dict(schedule="cosine"), "schedule must be one of"),
        (dict(confidence_threshold=1.5), "confidence_threshold"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(TargetModel(), _prompt(), mask_token_id=MASK, **kwargs)


def test_mask_token_is_never_committed():
    # A model that prefers the mask token everywhere must still finish decoding.
    out = generate(TargetModel(target_fn=lambda pos: torch.full_like(pos, MASK)), _prompt(), mask_token_id=MASK,
                   gen_length=8, steps=8)
    assert not (out.tokens == MASK).any()


def _reference_generate(model, prompt, mask, gen_length, steps, block_length, confidence_threshold=None):
    """LLaDA's reference loop (greedy, low-confidence remasking, uniform schedule): proposals and confidences for
    the whole sequence every step, positions outside the current block excluded by -inf."""
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask)], dim=1)
    per_block = steps // (gen_length // block_length)
    for block in range(gen_length // block_length):
        lo, hi = plen + block * block_length, plen + (block + 1) * block_length
        initial = (x[:, lo:hi] == mask).sum(dim=1)
        step = 0
        while bool((x[:, lo:hi] == mask).any()):
            logits = model(x).float()
            logits[..., mask] = float("-inf")
            probs = logits.softmax(-1)
            x0 = probs.argmax(-1)
            confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
            confidence[:, :lo] = confidence[:, hi:] = float("-inf")
            confidence[x != mask] = float("-inf")
            commit = torch.zeros_like(x, dtype=torch.bool)
            for b in range(batch):
                if confidence_threshold is not None:
                    chosen = (confidence[b] > confidence_threshold).nonzero().flatten().tolist()
                    chosen.append(int(confidence[b].argmax()))
                else:
                    remaining = int((x[b, lo:hi] == mask).sum())
                    base, extra = divmod(int(initial[b]), per_block)
                    count = remaining if step >= per_block - 1 else base + int(step < extra)
                    chosen = confidence[b].topk(count).indices.tolist()
                commit[b, [i for i in chosen if confidence[b, i] > float("-inf")]] = True
            x = torch.where(commit, x0, x)
            step += 1
    return x


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_block_proposals_commit_what_whole_sequence_proposals_commit(threshold):
    # generate proposes tokens for the current block only; LLaDA's loop proposes for every position and excludes
    # the others by confidence. Same tokens, greedy, over several blocks and a batch, on the trained in-repo model
    # (a random one proposes one token everywhere, where any commit order gives the same tokens).
    model = load_default_model()
    mask = model.cfg.mask_token_id
    prompt = torch.randint(0, mask, (3, 6), generator=torch.Generator().manual_seed(4))
    ours = generate(model, prompt, mask_token_id=mask, gen_length=24, steps=12, block_length=8,
                    confidence_threshold=threshold)
    reference = _reference_generate(model, prompt, mask, 24, 12, 8, threshold)
    assert len(set(reference[:, 6:].flatten().tolist())) > 3
    assert torch.equal(ours.tokens, reference)
