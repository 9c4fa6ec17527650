"""lowres_reft.rl.loss against plain-Python float64 references, hand-computed cases, autograd, and a
statistical check that uncapped sequence IS gives an unbiased policy gradient from off-policy samples."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from lowres_reft.rl.loss import (
    aggregate,
    correction_weights,
    group_advantages,
    kl_k3,
    policy_objective,
    sequence_ess,
)

INF = math.inf
LENGTHS = [7, 3, 0, 5, 1, 6]  # ragged, right-padded, one empty row; 2 groups of 3
T = 7


# ---------------------------------------------------------------- plain-Python float64 references


def ref_weights(logp, blogp, lengths, method, cap, lam):
    """w[i][t] by the definitions, one row and one token at a time."""
    out = [[0.0] * len(logp[0]) for _ in logp]
    for i, n in enumerate(lengths):
        rho = [math.exp(logp[i][t] - blogp[i][t]) for t in range(n)]
        for t in range(n):
            if method == "none":
                w = 1.0
            elif method == "tis":
                w = min(rho[t], cap)
            elif method == "seq_is":
                w = min(math.prod(rho), cap)
            else:
                w = min(rho[t], cap)
                for s in range(t + 1, n):
                    w *= lam * min(1.0, rho[s])
            out[i][t] = w
    return out


def ref_traces(logp, blogp, lengths, lam):
    traces = []
    for i, n in enumerate(lengths):
        for t in range(n):
            c = 1.0
            for s in range(t + 1, n):
                c *= lam * min(1.0, math.exp(logp[i][s] - blogp[i][s]))
            traces.append(c)
    return traces


def ref_advantages(rewards, g, scale="std", eps=1e-4):
    out = []
    for k in range(0, len(rewards), g):
        grp = rewards[k : k + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        out += [(r - mean) / (std + eps) if scale == "std" else r - mean for r in grp]
    return out


def ref_aggregate(x, lengths, mode, total_tokens, total_seqs, max_new_tokens):
    if mode == "token_mean":
        return sum(x[i][t] for i, n in enumerate(lengths) for t in range(n)) / total_tokens
    if mode == "seq_mean":
        return sum(sum(x[i][t] for t in range(n)) / n for i, n in enumerate(lengths) if n > 0) / total_seqs
    return sum(x[i][t] for i, n in enumerate(lengths) for t in range(n)) / (total_seqs * max_new_tokens)


def ref_ess(logp, blogp, lengths):
    ws = [math.exp(sum(logp[i][t] - blogp[i][t] for t in range(n))) for i, n in enumerate(lengths)]
    return sum(ws) ** 2 / (len(ws) * sum(w * w for w in ws))


def make_batch(seed=0, lengths=LENGTHS, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    logp = -3 * torch.rand(b, T, generator=gen, dtype=torch.float64)
    blogp = logp + 0.6 * torch.randn(b, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(b, T, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 3, (b,), generator=gen).double()
    # Garbage on the padding: none of it may leak into any result.
    blogp = torch.where(mask, blogp, -INF)
    logp = torch.where(mask, logp, 50.0)
    return logp.to(dtype), blogp.to(dtype), ref.to(dtype), rewards, mask


CORRECTION_CASES = [
    ("none", 2.0, 1.0),
    ("tis", 2.0, 1.0),
    ("tis", INF, 1.0),
    ("seq_is", 2.0, 1.0),
    ("seq_is", INF, 1.0),
    *[("retrace", cap, lam) for cap in (2.0, INF) for lam in (1.0, 0.5, 0.0)],
]


# ---------------------------------------------------------------- full pipeline vs the reference


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("method,cap,lam", CORRECTION_CASES)
def test_pipeline_matches_loop_reference(method, cap, lam, mode):
    logp, blogp, ref, rewards, mask = make_batch(seed=zlib.crc32(f"{method}{cap}{lam}{mode}".encode()))
    lp, bl, rf, rw = logp.tolist(), blogp.tolist(), ref.tolist(), rewards.tolist()
    tot_tok, tot_seq, max_new, beta = sum(LENGTHS) + 5, len(LENGTHS) + 2, T + 1, 0.05

    out = correction_weights(logp, blogp, mask, method, is_cap=cap, retrace_lambda=lam)
    w_ref = ref_weights(lp, bl, LENGTHS, method, cap, lam)
    torch.testing.assert_close(out.weights, torch.tensor(w_ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert not out.weights.requires_grad and torch.all(out.log_rho[~mask] == 0)

    rhos = [math.exp(lp[i][t] - bl[i][t]) for i, n in enumerate(LENGTHS) for t in range(n)]
    s = out.stats
    assert s["rho_mean"] == pytest.approx(sum(rhos) / len(rhos), rel=1e-10)
    assert s["rho_min"] == pytest.approx(min(rhos), rel=1e-10)
    assert s["rho_max"] == pytest.approx(max(rhos), rel=1e-10)
    assert s["ess"] == pytest.approx(ref_ess(lp, bl, LENGTHS), rel=1e-10)
    if method in ("tis", "retrace"):
        assert s["is_truncated_frac"] == pytest.approx(sum(r > cap for r in rhos) / len(rhos))
    elif method == "seq_is":
        prods = [math.prod(math.exp(lp[i][t] - bl[i][t]) for t in range(n)) for i, n in enumerate(LENGTHS) if n]
        assert s["is_truncated_frac"] == pytest.approx(sum(p > cap for p in prods) / len(prods))
    else:
        assert s["is_truncated_frac"] == 0.0
    if method == "retrace":
        traces = ref_traces(lp, bl, LENGTHS, lam)
        assert s["trace_mean"] == pytest.approx(sum(traces) / len(traces), rel=1e-10)
    else:
        assert math.isnan(s["trace_mean"])

    adv = group_advantages(rewards, 3)
    a_ref = ref_advantages(rw, 3)
    torch.testing.assert_close(adv, torch.tensor(a_ref, dtype=torch.float64))

    logp_leaf = logp.clone().requires_grad_(True)
    obj, clip_frac = policy_objective(logp_leaf, out.weights, adv, mask)
    agg = dict(total_tokens=tot_tok, total_seqs=tot_seq, max_new_tokens=max_new)
    loss = -aggregate(obj, mask, mode, **agg) + beta * aggregate(kl_k3(logp_leaf, ref), mask, mode, **agg)
    obj_ref = [[w_ref[i][t] * a_ref[i] for t in range(T)] for i in range(len(LENGTHS))]
    k3 = lambda d: math.exp(d) - d - 1
    kl_ref = [[k3(rf[i][t] - lp[i][t]) for t in range(T)] for i in range(len(LENGTHS))]
    loss_ref = -ref_aggregate(obj_ref, LENGTHS, mode, tot_tok, tot_seq, max_new) + beta * ref_aggregate(
        kl_ref, LENGTHS, mode, tot_tok, tot_seq, max_new
    )
    assert clip_frac == 0.0
    assert loss.item() == pytest.approx(loss_ref, rel=1e-10, abs=1e-14)
    loss.backward()
    assert torch.isfinite(logp_leaf.grad).all() and torch.all(logp_leaf.grad[~mask] == 0)


@pytest.mark.parametrize("method,cap,lam", CORRECTION_CASES)
def test_float32_and_bf16_follow_float64(method, cap, lam):
    logp, blogp, _, _, mask = make_batch(seed=7)
    w64 = correction_weights(logp, blogp, mask, method, cap, lam).weights
    w32 = correction_weights(logp.float(), blogp.float(), mask, method, cap, lam).weights
    assert w32.dtype == torch.float32 and w64.dtype == torch.float64
    torch.testing.assert_close(w32.double(), w64, rtol=1e-5, atol=1e-6)
    wbf = correction_weights(logp.bfloat16(), blogp.bfloat16(), mask.float(), method, cap, lam).weights
    assert wbf.dtype == torch.float32 and torch.isfinite(wbf).all()
    obj, _ = policy_objective(logp.bfloat16().requires_grad_(True), wbf, torch.ones(len(LENGTHS)), mask)
    assert obj.dtype == torch.float32


# ---------------------------------------------------------------- hand-computed tiny cases


def _one_row(rhos, pad=1):
    """One row with the given ratios (behavior_logp = 0) followed by `pad` garbage padding positions."""
    logp = torch.tensor([[math.log(r) for r in rhos] + [float("nan")] * pad], dtype=torch.float64)
    blogp = torch.tensor([[0.0] * len(rhos) + [-INF] * pad], dtype=torch.float64)
    mask = torch.tensor([[1] * len(rhos) + [0] * pad])
    return logp, blogp, mask


@pytest.mark.parametrize(
    "method,cap,lam,expected,truncated,trace_mean",
    [
        ("none", 2.0, 1.0, [1, 1, 1], 0.0, float("nan")),
        ("tis", 2.0, 1.0, [0.5, 2, 2], 1 / 3, float("nan")),  # 4 > cap; 2 is not above the cap
        ("tis", INF, 1.0, [0.5, 2, 4], 0.0, float("nan")),
        ("seq_is", 2.0, 1.0, [2, 2, 2], 1.0, float("nan")),  # prod = 0.5 * 2 * 4 = 4 -> capped at 2
        ("seq_is", INF, 1.0, [4, 4, 4], 0.0, float("nan")),
        ("retrace", 2.0, 1.0, [0.5, 2, 2], 1 / 3, 1.0),  # c = [0.5, 1, 1]; traces [1, 1, 1]
        ("retrace", 2.0, 0.5, [0.125, 1, 2], 1 / 3, 1.75 / 3),  # c = [.25, .5, .5]; traces [.25, .5, 1]
        ("retrace", 2.0, 0.0, [0, 0, 2], 1 / 3, 1 / 3),  # traces [0, 0, 1]
    ],
)
def test_hand_computed_rhos_half_two_four(method, cap, lam, expected, truncated, trace_mean):
    out = correction_weights(*_one_row([0.5, 2.0, 4.0]), method, is_cap=cap, retrace_lambda=lam)
    torch.testing.assert_close(out.weights, torch.tensor([expected + [0]], dtype=torch.float64))
    assert out.stats["is_truncated_frac"] == pytest.approx(truncated)
    assert out.stats["rho_mean"] == pytest.approx(6.5 / 3) and out.stats["rho_min"] == 0.5
    assert out.stats["rho_max"] == pytest.approx(4.0) and out.stats["ess"] == 1.0
    assert out.stats["trace_mean"] == pytest.approx(trace_mean, nan_ok=True)


def test_hand_computed_retrace_decreasing_rhos():
    # rhos 2, 0.5, 0.25 -> c = [1, 0.5, 0.25] -> traces [0.125, 0.25, 1] -> w = [2*0.125, 0.5*0.25, 0.25]
    out = correction_weights(*_one_row([2.0, 0.5, 0.25], pad=2), "retrace", is_cap=INF, retrace_lambda=1.0)
    torch.testing.assert_close(out.weights, torch.tensor([[0.25, 0.125, 0.25, 0, 0]], dtype=torch.float64))
    assert out.stats["trace_mean"] == pytest.approx(1.375 / 3)


def test_hand_computed_aggregation():
    x = torch.tensor([[1.0, 2.0, 3.0, INF], [4.0, float("nan"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kw = dict(total_tokens=4, total_seqs=2, max_new_tokens=4)
    assert aggregate(x, mask, "token_mean", **kw).item() == pytest.approx(10 / 4)
    assert aggregate(x, mask, "seq_mean", **kw).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(x, mask, "dr_grpo", **kw).item() == pytest.approx(10 / (2 * 4))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "dr_grpo"])
def test_micro_batches_sum_to_the_whole_batch(mode):
    logp, blogp, _, rewards, mask = make_batch(seed=3)
    w = correction_weights(logp, blogp, mask, "retrace").weights
    obj, _ = policy_objective(logp, w, group_advantages(rewards, 3), mask)
    kw = dict(total_tokens=int(mask.sum()), total_seqs=len(LENGTHS), max_new_tokens=T)
    whole = aggregate(obj, mask, mode, **kw)
    parts = sum(aggregate(obj[s], mask[s], mode, **kw) for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
    torch.testing.assert_close(parts, whole)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("method", ["tis", "retrace"])
def test_gradient_is_minus_w_times_a_over_normalizer(method, mode):
    logp, blogp, _, rewards, mask = make_batch(seed=11)
    w = correction_weights(logp, blogp, mask, method).weights
    adv = group_advantages(rewards, 3)
    leaf = logp.clone().requires_grad_(True)
    tot_tok, tot_seq, max_new = 40, 9, 16  # this micro-batch is part of a larger batch
    kw = dict(total_tokens=tot_tok, total_seqs=tot_seq, max_new_tokens=max_new)
    (-aggregate(policy_objective(leaf, w, adv, mask)[0], mask, mode, **kw)).backward()
    lens = mask.sum(1, keepdim=True).clamp(min=1).double()
    norm = {"token_mean": tot_tok, "seq_mean": tot_seq * lens, "dr_grpo": tot_seq * max_new}[mode]
    expected = torch.where(mask, -w * adv.unsqueeze(1) / norm, 0.0)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-15)


def test_ppo_clip_value_gradient_and_fraction():
    # ratios r = exp(logp - old): row 0 (A = +1): 1.5 clipped, 1.1 inside, 0.5 below but A > 0 -> not clipped;
    # row 1 (A = -2): 0.5 clipped, 1.5 above but A < 0 -> not clipped, padding.
    ratios = torch.tensor([[1.5, 1.1, 0.5], [0.5, 1.5, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 7.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.25, 0.0]], dtype=torch.float64)
    leaf = (old + ratios.log()).requires_grad_(True)
    obj, frac = policy_objective(leaf, w, adv, mask, old_logp=old, clip_eps=0.2, clip_eps_high=0.3)
    expected = [[0.5 * 1.3, 1.0 * 1.1, 2.0 * 0.5], [1.0 * 0.8 * -2, 0.25 * 1.5 * -2, 0.0]]
    torch.testing.assert_close(obj, torch.tensor(expected, dtype=torch.float64))
    assert frac == pytest.approx(2 / 5)
    obj.sum().backward()
    grad_ref = [[0.0, 1.0 * 1.1, 2.0 * 0.5], [0.0, 0.25 * 1.5 * -2, 0.0]]  # d(w r A)/dlogp = w r A
    torch.testing.assert_close(leaf.grad, torch.tensor(grad_ref, dtype=torch.float64))


def test_ppo_clip_fraction_depends_on_the_advantage_sign():
    # Asymmetric: only ratios above 1 + eps_high. With A > 0 they are clipped, with A < 0 they are not.
    ratios = torch.tensor([[1.5, 1.6, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.zeros(1, 3, dtype=torch.float64)
    w = torch.ones(1, 3, dtype=torch.float64)
    _, frac_pos = policy_objective(ratios.log(), w, torch.tensor([1.0], dtype=torch.float64), mask, old_logp=old)
    _, frac_neg = policy_objective(ratios.log(), w, torch.tensor([-1.0], dtype=torch.float64), mask, old_logp=old)
    assert frac_pos == pytest.approx(2 / 3)
    assert frac_neg == 0.0
    # And ratios below 1 - eps: clipped only with A < 0.
    low = torch.tensor([[0.5, 1.0, 1.0]], dtype=torch.float64)
    _, frac_pos = policy_objective(low.log(), w, torch.tensor([1.0], dtype=torch.float64), mask, old_logp=old)
    _, frac_neg = policy_objective(low.log(), w, torch.tensor([-1.0], dtype=torch.float64), mask, old_logp=old)
    assert (frac_pos, frac_neg) == (0.0, pytest.approx(1 / 3))


def test_ppo_first_update_equals_plain_objective():
    logp, blogp, _, rewards, mask = make_batch(seed=5)
    w = correction_weights(logp, blogp, mask, "tis").weights
    adv = group_advantages(rewards, 3)
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    obj_a, frac = policy_objective(a, w, adv, mask, old_logp=logp)
    obj_b, _ = policy_objective(b, w, adv, mask)
    torch.testing.assert_close(obj_a, obj_b)
    obj_a.sum().backward(), obj_b.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert frac == 0.0


# ---------------------------------------------------------------- advantages, KL, ESS, validation


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(ref_advantages(r.tolist(), 4)))
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor(ref_advantages(r.tolist(), 4, "none")))
    assert torch.all(group_advantages(r, 4)[4:8] == 0)  # all-equal group: zero, not NaN
    assert torch.all(group_advantages(torch.ones(6), 3, eps=0.0) == 0)
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32  # int rewards
    with pytest.raises(ValueError):
        group_advantages(r, 5)
    with pytest.raises(ValueError):
        group_advantages(r, 4, scale="minmax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_equal_reward_groups_get_exact_zero(dtype, eps, scale):
    # The float mean of G equal values is not always that value (8 x 0.1 in float32): without an exact
    # equality check eps = 0 turned the rounding error into advantages of -0.935.
    for value in (0.1, 0.2, 0.7, 1 / 3, 1.1):
        for g in range(2, 17):
            other = torch.full((g,), 2.0, dtype=dtype)
            other[0] = 0.0  # a second group that is not equal keeps its usual advantages
            r = torch.cat([torch.full((g,), value, dtype=dtype), other])
            adv = group_advantages(r, g, scale, eps)
            assert torch.equal(adv[:g], torch.zeros(g, dtype=dtype)), (value, g)
            expected = torch.tensor(ref_advantages(other.double().tolist(), g, scale, eps), dtype=dtype)
            torch.testing.assert_close(adv[g:], expected)


def test_kl_k3():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logp = (-5 * torch.rand(64, 32, generator=gen)).to(dtype)
        ref = logp + torch.randn(64, 32, generator=gen).to(dtype) * torch.logspace(-8, 0, 32).to(dtype)
        kl = kl_k3(logp, ref)
        assert kl.dtype == dtype and torch.all(kl >= 0)
        assert torch.all(kl_k3(logp, logp) == 0)
    lp, rf = logp.double().tolist(), ref.double().tolist()
    kl_ref = [[math.exp(rf[i][t] - lp[i][t]) - (rf[i][t] - lp[i][t]) - 1 for t in range(32)] for i in range(64)]
    torch.testing.assert_close(kl, torch.tensor(kl_ref, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    leaf = logp.clone().requires_grad_(True)
    kl_k3(leaf, ref).sum().backward()
    torch.testing.assert_close(leaf.grad, 1 - torch.exp(ref - logp))  # d/dlogp of exp(d) - d - 1


def test_sequence_ess():
    mask = torch.ones(4, 3)
    assert sequence_ess(torch.full((4, 3), 0.7), mask) == pytest.approx(1.0)
    dominated = torch.zeros(4, 3)
    dominated[2, 1] = 50.0
    assert sequence_ess(dominated, mask) == pytest.approx(1 / 4, rel=1e-6)
    extreme = torch.tensor([[200.0], [-200.0], [199.0]])  # log W = 200, -200, 199
    e = math.exp(-1)
    assert sequence_ess(extreme, torch.ones(3, 1)) == pytest.approx((1 + e) ** 2 / (3 * (1 + e * e)), rel=1e-6)
    assert sequence_ess(-extreme, torch.ones(3, 1)) == pytest.approx(1 / 3, rel=1e-6)
    padded = torch.tensor([[0.3, 1e9], [0.3, -1e9]])  # padding garbage ignored
    assert sequence_ess(padded, torch.tensor([[1, 0], [1, 0]])) == pytest.approx(1.0)


def test_unknown_method_or_mode_raises():
    logp, blogp, _, _, mask = make_batch()
    with pytest.raises(ValueError, match="correction"):
        correction_weights(logp, blogp, mask, "vtrace")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(logp, mask, "mean", total_tokens=1, total_seqs=1, max_new_tokens=1)


# ---------------------------------------------------------------- statistical (un)biasedness
# Sequences of length 3 over a vocabulary of 3 tokens (27 of them, enumerable). Autoregressive policies
# from logit tables theta[t, prev, next] (prev = 0 at t = 0); pi_theta is the learnable target, mu a
# different fixed behavior policy, R(y) a fixed random reward.


SEQ, VOCAB = 3, 3


def _token_logp(table, y):
    """(N, SEQ) token log-probs of the sequences y (N, SEQ) under the logit table (SEQ, VOCAB, VOCAB)."""
    prev = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], 1)
    return table.log_softmax(-1)[torch.arange(SEQ).expand_as(y), prev, y]


def _sample(table, n, gen):
    probs, y = table.softmax(-1), torch.zeros(n, SEQ, dtype=torch.long)
    prev = torch.zeros(n, dtype=torch.long)
    for t in range(SEQ):
        y[:, t] = prev = torch.multinomial(probs[t, prev], 1, generator=gen).squeeze(1)
    return y


def _gradient_estimates(method, cap, batches=50, n=400, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    theta = 0.8 * torch.randn(SEQ, VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    mu = 0.8 * torch.randn(SEQ, VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    reward = torch.rand(VOCAB**SEQ, generator=gen, dtype=torch.float64) + 0.5
    code = lambda y: (y * VOCAB ** torch.arange(SEQ - 1, -1, -1)).sum(1)  # lexicographic index

    # Exact on-policy gradient of J(theta) = sum_y pi_theta(y) R(y), by enumeration.
    every = torch.cartesian_prod(*[torch.arange(VOCAB)] * SEQ)
    leaf = theta.clone().requires_grad_(True)
    exact = torch.autograd.grad((_token_logp(leaf, every).sum(1).exp() * reward[code(every)]).sum(), leaf)[0]

    # Estimator through the module. With w = pi(y)/mu(y) (seq_is, uncapped) and A = R(y), summing the token
    # objective's gradient over a sequence gives (pi/mu)(y) R(y) sum_t grad log pi(y_t|.) = (pi/mu) R grad log pi(y),
    # the importance-sampled score-function estimator. dr_grpo with max_new_tokens = 1 is exactly that
    # per-sequence sum averaged over the n sequences (seq_mean would divide each sum by len = 3).
    grads = []
    for _ in range(batches):
        y = _sample(mu, n, gen)
        leaf = theta.clone().requires_grad_(True)
        logp, mask = _token_logp(leaf, y), torch.ones(n, SEQ, dtype=torch.bool)
        w = correction_weights(logp, _token_logp(mu, y), mask, method, is_cap=cap).weights
        obj, _ = policy_objective(logp, w, reward[code(y)], mask)
        est = aggregate(obj, mask, "dr_grpo", total_tokens=n * SEQ, total_seqs=n, max_new_tokens=1)
        grads.append(torch.autograd.grad(est, leaf)[0].flatten())
    g = torch.stack(grads)  # (batches, params): i.i.d. batch means, so the SE comes from their spread
    return g.mean(0), g.std(0) / math.sqrt(batches), exact.flatten()


def _max_z(mean, se, exact):
    used = se > 0  # theta[0, prev != 0] never gets a gradient (both sides exactly 0)
    assert torch.all(mean[~used] == 0) and torch.all(exact[~used] == 0)
    return ((mean - exact)[used].abs() / se[used]).max().item()


def test_uncapped_sequence_is_is_unbiased():
    assert _max_z(*_gradient_estimates("seq_is", INF)) < 4.5  # max over 21 components (0.95 at this seed)


@pytest.mark.parametrize("method,cap", [("none", 2.0), ("tis", 2.0)])
def test_token_level_corrections_are_biased_in_the_same_setup(method, cap):
    assert _max_z(*_gradient_estimates(method, cap)) > 6.0


def test_a_registered_correction_is_usable_by_name(monkeypatch):
    """A new correction is one registered function: the recipe accepts its name and correction_weights runs it."""
    from lowres_reft.config import recipe_from_dict
    from lowres_reft.rl import loss

    monkeypatch.setattr(loss, "CORRECTIONS", dict(loss.CORRECTIONS))  # keep the registry clean for other tests

    @loss.correction("half")
    def half(log_rho, m, cfg):
        return torch.where(m, 0.5, 0.0).to(log_rho.dtype), 0.0, float("nan")

    assert recipe_from_dict({"loss": {"correction": "half"}}).loss.correction == "half"
    logp, blogp, mask = _one_row([0.5, 2.0, 4.0], pad=1)
    assert correction_weights(logp, blogp, mask, "half").weights.tolist() == [[0.5, 0.5, 0.5, 0.0]]
    with pytest.raises(Exception, match="correction must be one of"):
        recipe_from_dict({"loss": {"correction": "vtrace"}})
