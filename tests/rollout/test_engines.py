"""Sampling engines: the static-cache engine reproduces the loop engine (greedy tokens, sampled tokens under the
same generator, behavior log-probs), and rows that finish leave the decode batch in both engines."""

import pytest
import torch
from arch_models import build, prompts

from lowres_reft.model.layers import decoder_stack
from lowres_reft.rollout.engine import make_engine
from lowres_reft.rollout.sampling import DecodeState, draw_tokens

SKIPS = [(), (0,), (0, 2), (1, 3)]  # includes layer 0, whose cache layer the sequence length is read from
EOS = [2, 7, 9, 11, 13]  # several EOS ids: rows of the mixed-length prompts end at different steps
ENGINES = ["loop", "static", "static_eager"]


def _run(model, engine, skip, greedy, steps=12, seed=3, **settings):
    settings = dict(dict(max_new_tokens=steps, eos_ids=EOS, pad_id=0, temperature=0.9, greedy=greedy,
                         generator=torch.Generator().manual_seed(seed)), **settings)
    return make_engine(engine, model, **settings).generate(prompts(), skip)


def _assert_same(ours, ref, atol):
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_mask, ref.completion_mask)
    assert torch.equal(ours.truncated, ref.truncated)
    torch.testing.assert_close(ours.behavior_logp, ref.behavior_logp, rtol=0, atol=atol)


def test_draw_tokens_is_inverse_cdf():
    """Hand-computed: probabilities (0.5, 0, 0.3, 0.2), cdf (0.5, 0.5, 0.8, 1.0); a zero-probability token is never
    drawn, and u just below 1 draws the last token that has mass."""
    logp = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).log().expand(7, 4)
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.95, 1.0 - 2**-24])  # clear of the cdf steps (rounding)
    assert draw_tokens(logp, u).tolist() == [0, 0, 2, 2, 3, 3, 3]
    trailing_zero = torch.tensor([[0.25, 0.75, 0.0]]).log()
    assert draw_tokens(trailing_zero, torch.tensor([1.0 - 2**-24])).tolist() == [1]


def test_draw_tokens_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draw_tokens(probs.log().expand(len(u), 4), u), minlength=4).double() / len(u)
    torch.testing.assert_close(counts, probs.double(), rtol=0, atol=5e-3)
    assert counts[2] == 0


# The architecture models' LM head is scaled so |logits| ~ tens: fp32 rounding of attention over a longer (masked)
# static key range moves their log-probs by a few 1e-6; the unscaled tiny model below is held to 1e-6.
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3"])
def test_static_engine_equals_loop_engine(arch):
    model = build(arch)
    for skip in SKIPS:
        for greedy in (True, False):
            ref = _run(model, "loop", skip, greedy)
            assert ref.completion_mask.sum() >= 6
            for engine in ("static", "static_eager"):
                _assert_same(_run(model, engine, skip, greedy), ref, atol=2e-5)


def test_static_engine_equals_loop_engine_4bit_lora_top_p(tiny_policy):
    """The tiny NF4 + LoRA policy, nucleus sampling, micro-batches: same tokens, behavior log-probs within 1e-6."""
    policy = tiny_policy()
    tok = policy.tokenizer
    texts = ["Tom has 3 apples. He gets 4 more.", "Q: 2+2", "Ann has 9 pens."]
    batch = [tok(t)["input_ids"] for t in texts for _ in range(2)]
    for skip in ((), (0,), (1, 2)):
        runs = {}
        for engine in ENGINES:
            runs[engine] = make_engine(engine, policy.model, max_new_tokens=16, eos_ids=list(range(3, 40)),
                                       pad_id=tok.pad_token_id, temperature=0.7, top_p=0.9, micro_batch=4,
                                       generator=torch.Generator().manual_seed(1)).generate(batch, skip)
        lengths = runs["loop"].completion_mask.sum(1)
        assert lengths.min() < lengths.max()  # rows finished at different steps
        for engine in ENGINES[1:]:
            _assert_same(runs[engine], runs["loop"], atol=1e-6)


class _BatchSizes:
    """Records the batch size every call of decoder layer 0 sees (prefill first, then one per decode step)."""

    def __init__(self, model):
        self.sizes = []
        self.handle = decoder_stack(model).layers[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.sizes.append(hidden.shape[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_finished_rows_leave_the_batch_and_decoding_stops(engine):
    """At each decode step the layers see only the rows still live, and the last forward is the one producing the
    longest completion's last token: no step runs after every row is done."""
    model = build("qwen2")
    for skip in ((), (1, 3)):
        counter = _BatchSizes(model)
        try:
            batch = _run(model, engine, skip, greedy=False, steps=20, seed=5, eos_ids=list(range(2, 40)), temperature=3.0)
        finally:
            counter.handle.remove()
        lengths = batch.completion_mask.sum(1).long()
        longest = int(lengths.max())
        assert int(lengths.min()) < longest < 20  # some finish early, all finish before the budget
        live_before = [int((lengths > t).sum()) for t in range(longest)]  # rows still decoding at step t
        assert counter.sizes == [len(lengths)] + live_before[1:]
        assert counter.sizes[-1] < counter.sizes[0]


@pytest.mark.parametrize("engine", ["loop", "static_eager"])
def test_compaction_does_not_change_the_samples(engine, monkeypatch):
    """One uniform per row and step, drawn for all rows: the same sequences whether finished rows leave the batch
    or keep decoding (compaction switched off here)."""
    model = build("gemma3")
    settings = dict(greedy=False, steps=16, seed=5, eos_ids=list(range(2, 40)), temperature=3.0)
    counter = _BatchSizes(model)  # on layer 0: kept by the skip set (1, 3)
    try:
        compacted = _run(model, engine, (1, 3), **settings)
        assert min(counter.sizes) < 3  # compacted
        counter.sizes.clear()
        monkeypatch.setattr(DecodeState, "live_count", lambda self: len(self.rows))  # never compact
        full = _run(model, engine, (1, 3), **settings)
    finally:
        counter.handle.remove()
    assert set(counter.sizes) == {3}  # really not compacted
    lengths = compacted.completion_mask.sum(1)
    assert lengths.min() < lengths.max()
    _assert_same(compacted, full, atol=2e-5)


@pytest.mark.gpu
def test_cuda_graph_engine_equals_eager_on_cuda(tiny_cache):
    """On CUDA, "static" replays a captured decode step (re-captured as rows leave); it must equal the eager engines."""
    from conftest import randomize_lora, tiny_model_cfg

    from lowres_reft.config import LoraConfig
    from lowres_reft.model.loader import load_policy

    policy = load_policy(tiny_model_cfg(device="cuda", load_in_4bit=True), LoraConfig(r=4, alpha=8, dropout=0.0),
                         cache_dir=tiny_cache)
    randomize_lora(policy.model)
    tok = policy.tokenizer
    batch = [tok(t)["input_ids"] for t in ["Tom has 3 apples.", "Q: 2+2", "Ann has 9 pens and 4 cups."] for _ in range(6)]
    runs = {}
    for engine in ENGINES:
        runs[engine] = make_engine(engine, policy.model, max_new_tokens=40, eos_ids=list(range(3, 30)),
                                   pad_id=tok.pad_token_id, temperature=0.8,
                                   generator=torch.Generator(device="cuda").manual_seed(0)).generate(batch, (1,))
    lengths = runs["loop"].completion_mask.sum(1)
    assert lengths.min() < lengths.max()
    for engine in ENGINES[1:]:
        assert torch.equal(runs[engine].completion_ids, runs["loop"].completion_ids)
        torch.testing.assert_close(runs[engine].behavior_logp, runs["loop"].behavior_logp, rtol=0, atol=1e-4)
