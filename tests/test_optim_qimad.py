"""QIMAD: the seed's dynamics (checked against a literal re-computation of a step), the vectorised
and closure paths agreeing, bit-identical resumption, and the fixes (NaN agents, round robin,
tunnelling, cooling, topologies)."""

from __future__ import annotations

import io
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcd_fx.examples import digits_cnn, digits_mlp
from qcd_fx.optim import QIMAD
from qcd_fx.optim.population import BatchedEvaluator
from qcd_fx.optim.qimad import build_neighbors, fidelity_matrix, temperature

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n, seed=0, batch=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _mlp(seed=0, hidden=32, dtype=torch.float32):
    torch.manual_seed(seed)
    return digits_mlp(hidden=hidden).to(dtype)


def _run_batched(model, opt, batches):
    return [opt.step(model=model, batch=b, loss_fn=F.cross_entropy) for b in batches]


def _run_closure(model, opt, batches):
    out = []
    for x, y in batches:

        def closure(x=x, y=y):  # bound now: the closure is called within this iteration anyway
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        out.append(opt.step(closure))
    return out


# ── the seed's formulas ────────────────────────────────────────────────────────────────────────


def _seed_fidelity(ai, bi, aj, bj, k):
    """The seed's ``QIMADTorch._fidelity``, literally."""
    re = math.cos(ai / 2) * math.cos(aj / 2) + math.cos(bj - bi) * math.sin(ai / 2) * math.sin(aj / 2)
    im = math.sin(bj - bi) * math.sin(ai / 2) * math.sin(aj / 2)
    return (re**2 + im**2) ** (k / 2)


def test_fidelity_matrix_equals_the_seed_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, generator=g, dtype=torch.float64) * math.pi
    b = torch.rand(6, generator=g, dtype=torch.float64) * 2 * math.pi
    for k in (1, 2, 3.5):
        f = fidelity_matrix(a, b, k)
        for i in range(6):
            for j in range(6):
                assert float(f[i, j]) == pytest.approx(_seed_fidelity(float(a[i]), float(b[i]), float(a[j]), float(b[j]), k), rel=1e-12, abs=1e-15)
        assert torch.allclose(torch.diagonal(f), torch.ones(6, dtype=torch.float64))


def test_temperature_schedules_match_the_seed_and_never_increase():
    for cooling in ("cosine", "linear", "exponential"):
        ts = [temperature(s, 100, cooling, 0.05) for s in range(130)]
        assert ts[0] == pytest.approx(1.0)
        assert ts[100] == pytest.approx(0.05 if cooling != "exponential" else max(0.05, math.exp(-5)))
        assert all(a >= b for a, b in itertools.pairwise(ts))
    assert temperature(50, 100, "cosine", 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert temperature(30, None, "cosine", 0.05) == 1.0
    assert temperature(30, 100, None, 0.05) == 1.0


def test_topologies():
    assert build_neighbors(4, "complete") == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert build_neighbors(5, "ring") == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]
    assert build_neighbors(1, "ring") == [[]]
    assert build_neighbors(2, "ring") == [[1], [0]]
    # 8 agents on a 3x3 grid (last cell empty)
    assert build_neighbors(8, "grid") == [[3, 1], [4, 0, 2], [5, 1], [0, 6, 4], [1, 7, 3, 5], [2, 4], [3, 7], [4, 6]]
    r1 = build_neighbors(10, "random", torch.Generator().manual_seed(5))
    r2 = build_neighbors(10, "random", torch.Generator().manual_seed(5))
    r3 = build_neighbors(10, "random", torch.Generator().manual_seed(6))
    assert r1 == r2 and r1 != r3
    assert all(row and i not in row for i, row in enumerate(r1))
    assert all(i in r1[j] for i, row in enumerate(r1) for j in row)  # symmetric


def test_single_agent_without_bias_correction_is_torch_rmsprop():
    """The seed's claim: one agent has no neighbours, so QIMAD is pure RMSProp."""
    batches = _batches(6)
    m1, m2 = _mlp(), _mlp()
    q = QIMAD(m1.parameters(), num_agents=1, lr=1e-3, bias_correction=False, seed=0, total_steps=6)
    _run_batched(m1, q, batches)
    r = torch.optim.RMSprop(m2.parameters(), lr=1e-3, alpha=0.99, eps=1e-8)
    for x, y in batches[:-1]:  # QIMAD's model holds the agent's *evaluated* (pre-update) weights
        r.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        r.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_step_with_bias_correction_moves_weights_by_about_lr():
    m = _mlp()
    before = [p.detach().clone() for p in m.parameters()]
    for bias_correction, expected in ((True, 1.0), (False, 10.0)):
        opt = QIMAD(m.parameters(), num_agents=1, lr=1e-3, bias_correction=bias_correction, seed=0, total_steps=10)
        opt.step(model=m, batch=_batches(1)[0], loss_fn=F.cross_entropy)
        moved = (opt.agent_positions()[0] - torch.cat([b.flatten() for b in before])).abs()
        big = moved[moved > 1e-6]  # elements with a non-zero gradient move by lr*|g|/(sqrt((1-rho) g^2 / bc))
        assert float(big.median()) == pytest.approx(expected * 1e-3, rel=1e-3)


def _literal_first_step(model, batch, n, seed, lr, gamma, k, pull, init_noise, rho=0.99, eps=1e-8):
    """One QIMAD step recomputed from the documented formulas, drawing the same random numbers."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    flat = torch.cat([p.detach().flatten() for p in params])
    pos = flat.repeat(n, 1)
    rms = torch.cat([torch.full((p.numel(),), float(p.detach().double().pow(2).mean().sqrt())) for p in params])
    pos[1:] += torch.randn(n - 1, flat.numel(), generator=gen) * (init_noise * rms)
    angles = torch.rand(2, n, generator=gen, dtype=torch.float64)
    alphas, betas = (angles[0] * math.pi).tolist(), (angles[1] * 2 * math.pi).tolist()
    losses, grads = [], []
    for i in range(n):  # evaluate every agent at the pre-step positions
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(pos[i, off : off + p.numel()].view_as(p))
                off += p.numel()
        model.zero_grad()
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    best = min(range(n), key=lambda i: losses[i])
    torch.randn(2, n, generator=gen, dtype=torch.float64)  # the angle random walk
    uniforms = torch.rand(2, n, generator=gen, dtype=torch.float64)
    new = pos.clone()
    for i in range(n):
        nb = [j for j in range(n) if j != i]
        raw = [_seed_fidelity(alphas[i], betas[i], alphas[j], betas[j], k) for j in nb]
        wsum = sum(raw) + 1e-8
        v = (1 - rho) * grads[i] ** 2
        delta = -lr * grads[i] / (torch.sqrt(v / (1 - rho)) + eps)
        delta += pull * float(uniforms[1, i]) * (pos[best] - pos[i])
        delta += gamma * sum((w / wsum) * (pos[j] - pos[i]) for w, j in zip(raw, nb))
        new[i] = pos[i] + delta  # synchronous: every term uses the pre-step positions
    return new, pos[best], losses[best]


def test_one_step_equals_a_literal_recomputation_of_the_dynamics():
    batch = _batches(1, batch=16)[0]
    kw = {"lr": 3e-3, "gamma": 0.3, "k": 3, "pull": 0.2, "init_noise": 0.05}
    ref_model = _mlp(hidden=16)
    expected, best_row, best_loss = _literal_first_step(ref_model, batch, n=4, seed=11, **kw)
    model = _mlp(hidden=16)
    opt = QIMAD(model.parameters(), num_agents=4, seed=11, total_steps=10, **kw)
    loss = opt.step(model=model, batch=batch, loss_fn=F.cross_entropy)
    torch.testing.assert_close(opt.agent_positions(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]), best_row, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(best_loss, rel=1e-5)


# ── paths agree ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("k_eval", [None, 3, 4])  # 4 of 6: round-robin windows that wrap around
def test_vmap_and_closure_paths_give_the_same_trajectory(k_eval):
    batches = _batches(8)
    m1, m2 = _mlp(), _mlp()
    kw = {"num_agents": 6, "seed": 3, "k_eval": k_eval, "total_steps": 8, "patience": 1}
    o1, o2 = QIMAD(m1.parameters(), **kw), QIMAD(m2.parameters(), **kw)
    l1 = _run_batched(m1, o1, batches)
    l2 = _run_closure(m2, o2, batches)
    torch.testing.assert_close(o1.agent_positions(), o2.agent_positions(), rtol=0, atol=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert l1 == pytest.approx(l2, abs=1e-5)
    assert o1.best_agent == o2.best_agent


def test_loop_evaluation_equals_vmap_evaluation():
    batches = _batches(5)
    m1, m2 = _mlp(), _mlp()
    o1 = QIMAD(m1.parameters(), seed=1, total_steps=5, evaluation="vmap")
    o2 = QIMAD(m2.parameters(), seed=1, total_steps=5, evaluation="loop")
    _run_batched(m1, o1, batches)
    _run_batched(m2, o2, batches)
    torch.testing.assert_close(o1.agent_positions(), o2.agent_positions(), rtol=0, atol=1e-5)


def _model_state(m):
    return [(n, t.data_ptr(), t.requires_grad, t.detach().clone()) for n, t in [*m.named_parameters(), *m.named_buffers()]]


def test_loop_evaluation_restores_the_model_and_agrees_with_vmap():
    """The loop points the model's parameters and buffers at each copy's rows and puts them back,
    also when the loss raises; a frozen parameter is differentiated and stays frozen."""
    torch.manual_seed(0)
    m = digits_cnn(width=4)
    params = list(m.parameters())
    params[0].requires_grad_(False)
    before = _model_state(m)
    lay = BatchedEvaluator(m, params, mode="loop").layout
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(3, lay.dim, generator=g) * 0.1
    x, y = _batches(1, batch=16)[0]
    stacks = {n: b.detach().unsqueeze(0).repeat(3, *([1] * b.dim())) for n, b in m.named_buffers()}
    results = {}
    for mode in ("loop", "vmap"):
        bufs = {n: s.clone() for n, s in stacks.items()}
        results[mode] = (BatchedEvaluator(m, params, mode=mode)(pos, x, y, F.cross_entropy, buffers=bufs), bufs)
    (ev_l, bufs_l), (ev_v, bufs_v) = results["loop"], results["vmap"]
    torch.testing.assert_close(ev_l.losses, ev_v.losses, rtol=0, atol=1e-5)
    torch.testing.assert_close(ev_l.grads, ev_v.grads, rtol=0, atol=1e-5)
    assert float(ev_l.grads[:, : params[0].numel()].abs().sum()) > 0  # the frozen tensor got its gradient
    for n in stacks:
        torch.testing.assert_close(bufs_l[n], bufs_v[n], rtol=0, atol=1e-6)
    assert any(not torch.equal(bufs_l[n], stacks[n]) for n in stacks)  # running statistics moved, in the stacks

    def boom(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        BatchedEvaluator(m, params, mode="loop")(pos, x, y, boom, buffers={n: s.clone() for n, s in stacks.items()})
    after = _model_state(m)
    assert [(n, p, r) for n, p, r, _ in after] == [(n, p, r) for n, p, r, _ in before]
    for (_, _, _, a), (_, _, _, b) in zip(after, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k_eval, reuse", [(None, True), (3, True), (3, False)])
def test_fused_step_equals_the_reference_step(k_eval, reuse):
    """The fused-Adam (beta1 = 0) update and the separate-operations update are the same dynamics,
    with agents moving in subsets (first steps of a round robin) and all at once, and tunnelling."""
    batches = _batches(10)
    m1, m2 = _mlp(), _mlp()
    kw = {"num_agents": 6, "seed": 5, "k_eval": k_eval, "total_steps": 10, "patience": 0, "reuse_gradients": reuse}
    o1, o2 = QIMAD(m1.parameters(), **kw), QIMAD(m2.parameters(), **kw)
    o2._fused = False
    l1, l2 = _run_batched(m1, o1, batches), _run_batched(m2, o2, batches)
    assert o1._fused and not o2._fused  # the fused path ran, and kept running
    assert (o1._spare is not None) == reuse  # all agents moved at once (its second buffer) when gradients are reused
    assert o1.tunnels > 0 and o1.tunnels == o2.tunnels
    torch.testing.assert_close(o1.agent_positions(), o2.agent_positions(), rtol=0, atol=1e-5)
    torch.testing.assert_close(o1.state_dict()["qimad"]["rms"], o2.state_dict()["qimad"]["rms"], rtol=1e-5, atol=1e-9)
    assert l1 == pytest.approx(l2, abs=1e-5)


class _ItemNet(nn.Module):
    """Calls ``.item()`` on a weight: torch.func.vmap cannot batch that."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        s = float(self.lin.weight.abs().max())
        return self.lin(x.flatten(1)) / max(s, 1.0)


def test_vmap_failure_falls_back_to_the_loop_with_one_warning():
    batches = _batches(3)
    torch.manual_seed(0)
    m1 = _ItemNet()
    torch.manual_seed(0)
    m2 = _ItemNet()
    o1 = QIMAD(m1.parameters(), seed=0, total_steps=3)
    o2 = QIMAD(m2.parameters(), seed=0, total_steps=3, evaluation="loop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_batched(m1, o1, batches)
    fallback = [w for w in caught if "vmap cannot evaluate" in str(w.message)]
    assert len(fallback) == 1
    _run_batched(m2, o2, batches)
    assert torch.equal(o1.agent_positions(), o2.agent_positions())
    # and "vmap" mode really cannot run it: torch.func's own error, not a parameter mismatch (the
    # optimizer must hold the parameters of the model it is given, or step() refuses before vmap)
    m3 = _ItemNet()
    with pytest.raises(RuntimeError, match=r"vmap: .*calling \.item\(\) on a Tensor"):
        QIMAD(m3.parameters(), seed=0, total_steps=3, evaluation="vmap").step(model=m3, batch=batches[0], loss_fn=F.cross_entropy)


@pytest.mark.parametrize("k_eval, expected", [(None, "vmap"), (3, "vmap"), (2, "loop"), (1, "loop")])
def test_auto_evaluation_uses_the_loop_for_one_or_two_agents(k_eval, expected):
    m = _mlp()
    opt = QIMAD(m.parameters(), seed=0, k_eval=k_eval, total_steps=3)
    assert opt.evaluation_mode is None
    _run_batched(m, opt, _batches(2))
    assert opt.evaluation_mode == expected


def test_round_robin_updates_the_running_statistics_of_the_evaluated_agents_only():
    torch.manual_seed(0)
    m = digits_cnn(width=4)
    opt = QIMAD(m.parameters(), num_agents=4, k_eval=2, seed=0, total_steps=4)
    batches = _batches(2, batch=16)
    opt.step(model=m, batch=batches[0], loss_fn=F.cross_entropy)
    name = next(n for n in opt._pop.buffers if n.endswith("running_mean"))
    stack = opt._pop.buffers[name]
    fresh = torch.zeros_like(stack[0])  # BatchNorm starts at 0: agents 0, 1 have seen one batch
    assert not torch.equal(stack[0], fresh) and not torch.equal(stack[1], fresh)
    assert torch.equal(stack[2], fresh) and torch.equal(stack[3], fresh)
    before = stack[:2].clone()
    opt.step(model=m, batch=batches[1], loss_fn=F.cross_entropy)  # agents 2, 3
    assert torch.equal(stack[:2], before)
    assert not torch.equal(stack[2], fresh) and not torch.equal(stack[3], fresh)


# ── resumption ─────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("k_eval", [None, 3])
def test_state_dict_resume_is_bit_identical(k_eval):
    """A CNN with BatchNorm (per-agent running statistics), tunnelling allowed (patience 1)."""
    batches = _batches(12, batch=16)

    def make():
        torch.manual_seed(0)
        m = digits_cnn(width=4)
        return m, QIMAD(m.parameters(), num_agents=5, seed=7, k_eval=k_eval, patience=1, total_steps=12, topology="random")

    m1, o1 = make()
    l1 = _run_batched(m1, o1, batches)

    m2, o2 = make()
    l2 = _run_batched(m2, o2, batches[:6])
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m3, o3 = make()
    m3.load_state_dict(saved["model"])
    o3.load_state_dict(saved["opt"])
    l2 += _run_batched(m3, o3, batches[6:])
    assert l1 == l2
    assert torch.equal(o1.agent_positions(), o3.agent_positions())
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b)
    assert o1.tunnels == o3.tunnels


def test_same_seed_same_run_and_different_seed_different_run():
    batches = _batches(4)
    runs = []
    for seed in (5, 5, 6):
        m = _mlp()
        o = QIMAD(m.parameters(), seed=seed, total_steps=4, topology="random")
        _run_batched(m, o, batches)
        runs.append(o.agent_positions().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ── the fixes ──────────────────────────────────────────────────────────────────────────────────


def test_model_holds_the_best_agent_and_step_returns_its_loss():
    m = _mlp()
    opt = QIMAD(m.parameters(), seed=0, total_steps=10, loss_ema=0.0)
    for x, y in _batches(3):
        loss = opt.step(model=m, batch=(x, y), loss_fn=F.cross_entropy)
        with torch.no_grad():
            assert float(F.cross_entropy(m(x), y)) == pytest.approx(loss, rel=1e-5)
        assert loss == min(opt.get_agent_losses())


def test_agents_start_apart_and_agent_zero_keeps_the_model():
    m = _mlp()
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    opt = QIMAD(m.parameters(), seed=0, init_noise=0.01, total_steps=1, lr=1e-12, gamma=0.0, pull=0.0)
    opt.enable_tracking()
    x, y = _batches(1)[0]
    opt.step(model=m, batch=(x, y), loss_fn=F.cross_entropy)
    pos = opt.agent_positions()
    torch.testing.assert_close(pos[0], flat, rtol=0, atol=1e-9)  # lr 1e-12: agent 0 barely moved
    assert all(float((pos[i] - flat).abs().max()) > 1e-4 for i in range(1, 8))
    assert len(set(opt.get_agent_losses())) == 8  # so the agents see different losses on the same batch
    assert opt.get_log()["diversity"][0] > 0


@pytest.mark.parametrize("reuse_gradients", [False, True])
def test_round_robin_moves_only_agents_with_gradients(reuse_gradients):
    m = _mlp()
    opt = QIMAD(m.parameters(), num_agents=6, k_eval=2, seed=0, total_steps=5, reuse_gradients=reuse_gradients)
    batches = _batches(3)
    prev = None
    for step, b in enumerate(batches):
        opt.step(model=m, batch=b, loss_fn=F.cross_entropy)
        pos = opt.agent_positions().clone()
        if prev is not None:
            moved = [i for i in range(6) if not torch.equal(pos[i], prev[i])]
            evaluated = {2 * step, 2 * step + 1}
            if reuse_gradients:  # every agent evaluated so far moves again with its cached gradient
                assert moved == list(range(2 * step + 2))
            else:  # the seed's code: only this step's agents move
                assert set(moved) == evaluated
        prev = pos
    assert opt.get_agent_losses()[:6].count(math.inf) == 0


def test_nonfinite_agents_are_reset_to_the_best_and_counted():
    m = _mlp()
    opt = QIMAD(m.parameters(), num_agents=4, seed=0, total_steps=10)
    batches = _batches(3)
    opt.step(model=m, batch=batches[0], loss_fn=F.cross_entropy)
    with torch.no_grad():
        opt.agent_positions()[2, :10] = float("nan")  # agent 2 is poisoned
    loss = opt.step(model=m, batch=batches[1], loss_fn=F.cross_entropy)
    assert math.isfinite(loss)
    assert opt.nonfinite_resets == 1
    assert torch.isfinite(opt.agent_positions()).all()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    opt.step(model=m, batch=batches[2], loss_fn=F.cross_entropy)
    assert torch.isfinite(opt.agent_positions()).all()


def test_all_agents_nonfinite_returns_nan_and_keeps_the_model():
    m = _mlp()
    before = [p.detach().clone() for p in m.parameters()]
    opt = QIMAD(m.parameters(), num_agents=3, seed=0, total_steps=2)
    x, y = _batches(1)[0]
    loss = opt.step(model=m, batch=(x * float("nan"), y), loss_fn=F.cross_entropy)
    assert math.isnan(loss)
    assert opt.nonfinite_resets == 3
    for a, b in zip(before, m.parameters()):
        assert torch.equal(a, b)


def test_stagnating_agents_tunnel_with_bounded_jumps():
    """lr ~ 0, no pull or communication: the loss stalls, agents stagnate and tunnel; every jump
    is uniform within +-(0.8 mean|theta_p| + 0.1) T per tensor."""
    m = _mlp(hidden=8)
    opt = QIMAD(m.parameters(), num_agents=6, seed=2, lr=1e-12, gamma=0.0, pull=0.0, patience=0, loss_ema=0.0, total_steps=40, init_noise=0.0)
    opt.enable_tracking()
    x, y = _batches(1)[0]
    shapes = [p.shape for p in m.parameters()]
    for step in range(1, 16):
        before = opt.agent_positions().clone() if opt.best_agent is not None else None
        temp = temperature(step, 40, "cosine", 0.05)
        opt.step(model=m, batch=(x, y), loss_fn=F.cross_entropy)
        if before is None:
            continue
        after = opt.agent_positions()
        for i in range(6):
            off = 0
            for s in shapes:
                n = math.prod(s)
                jump = (after[i, off : off + n] - before[i, off : off + n]).abs()
                bound = (before[i, off : off + n].abs().mean() * 0.8 + 0.1) * temp
                assert float(jump.max()) <= float(bound) * (1 + 1e-5) + 1e-6
                off += n
    log = opt.get_log()
    assert opt.tunnels == sum(log["tunnels"]) > 0


def test_fit_sets_total_steps_and_cooling_warns_without_it():
    m = _mlp()
    opt = QIMAD(m.parameters(), seed=0)
    with pytest.warns(RuntimeWarning, match="cooling is off"):
        opt.step(model=m, batch=_batches(1)[0], loss_fn=F.cross_entropy)
    opt2 = QIMAD(m.parameters(), seed=0)
    opt2.set_total_steps(50)
    assert opt2.param_groups[0]["total_steps"] == 50
    opt2.set_total_steps(70, only_if_unset=True)
    assert opt2.param_groups[0]["total_steps"] == 50


def test_lr_scheduler_and_per_group_learning_rates():
    m = _mlp()
    params = list(m.parameters())
    start = torch.cat([p.detach().flatten() for p in params])  # agent 0 starts exactly here
    opt = QIMAD([{"params": params[:2]}, {"params": params[2:], "lr": 1e-4}], num_agents=2, lr=1e-3, seed=0, total_steps=5, gamma=0.0, pull=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    x, y = _batches(1)[0]
    opt.step(model=m, batch=(x, y), loss_fn=F.cross_entropy)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-5)
    # first step with bias correction moves each weight by lr * |g| / (|g| + eps): ~lr per group
    n0 = params[0].numel() + params[1].numel()
    moved = (opt.agent_positions()[0] - start).abs()
    for segment, lr in ((moved[:n0], 1e-3), (moved[n0:], 1e-4)):
        live = segment[segment > lr * 1e-2]
        assert float(live.max()) <= lr * (1 + 1e-4)
        assert float(live.median()) == pytest.approx(lr, rel=1e-3)
    # the second step uses the scheduled learning rates
    before = opt.agent_positions()[0].clone()
    opt.step(model=m, batch=(x, y), loss_fn=F.cross_entropy)
    second = (opt.agent_positions()[0] - before).abs()
    assert float(second[:n0].max()) < 1e-3 * 0.2


@pytest.mark.parametrize(
    "kwargs, message",
    [  # the message names the argument first, then what it must be, and echoes the bad value
        ({"num_agents": 0}, r"^num_agents must be an integer >= 1, got 0$"),
        ({"num_agents": 2.5}, r"^num_agents must be an integer >= 1, got 2\.5$"),
        ({"k_eval": 0}, r"^k_eval must be an integer >= 1, got 0$"),
        ({"k_eval": 9}, r"^k_eval must be <= num_agents \(8\), got 9$"),
        ({"lr": 0.0}, r"^lr must be .*, got 0\.0$"),
        ({"lr": 1e-3, "eta": 1e-3}, r"lr or its alias eta, not both"),
        ({"topology": "star"}, r"^topology must be one of .*random.*, got 'star'$"),
        ({"cooling": "fast"}, r"^cooling must be one of .*, got 'fast'$"),
        ({"total_steps": 0}, r"^total_steps must be an integer >= 1, got 0$"),
        ({"min_temp": 2.0}, r"^min_temp must be .*, got 2\.0$"),
        ({"rms_decay": 1.0}, r"^rms_decay must be .*, got 1\.0$"),
        ({"loss_ema": 1.0}, r"^loss_ema must be .*, got 1\.0$"),
        ({"gamma": -1.0}, r"^gamma must be .*, got -1\.0$"),
        ({"patience": -1}, r"^patience must be an integer >= 0, got -1$"),
        ({"evaluation": "gpu"}, r"^evaluation must be one of .*vmap.*, got 'gpu'$"),
        ({"seed": -3}, r"^seed must be an integer >= 0, got -3$"),
        ({"bias_correction": "yes"}, r"^bias_correction must be True or False, got 'yes'$"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        QIMAD([torch.zeros(3, requires_grad=True)], **kwargs)
    assert "\n" not in str(info.value)


def test_bad_step_calls():
    m = _mlp()
    opt = QIMAD(m.parameters(), seed=0, total_steps=3)
    with pytest.raises(ValueError, match=r"^QIMAD\.step needs a closure, or model="):
        opt.step()
    with pytest.raises(ValueError, match=r"^QIMAD\.step\(model=\.\.\.\) also needs batch="):
        opt.step(model=m, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"either a closure or model=.*, not both"):
        opt.step(lambda: 0.0, model=m)
    with pytest.raises(ValueError, match=r"^num_agents is a swarm-wide setting"):
        QIMAD([{"params": [torch.zeros(2, requires_grad=True)], "num_agents": 3}, {"params": [torch.zeros(2, requires_grad=True)]}])
    with pytest.raises(ValueError, match=r"share one dtype and device, got dtypes \[.*float32.*float64.*\]"):
        QIMAD([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]).step(lambda: torch.tensor(0.0))
    other = _mlp()
    with pytest.raises(ValueError, match=r"^optimizer parameter #0 \(shape \(32, 64\)\) is not a parameter of the model"):
        opt.step(model=other, batch=_batches(1)[0], loss_fn=F.cross_entropy)
