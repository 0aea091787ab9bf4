"""The fused batch-softmax and proxy losses (``deepmetric.losses._fused``) against plain autograd.

Every fused path (label fast path, masked path for mined indices / reference sets / unbalanced
classes, constant-shift and row-maximum branches of the exponentials, zero rows, duplicates) must
give the value and gradients of the straightforward autograd formulation (the implementations the
fused ones replaced, themselves checked against the naive loops of ``tests/reference``). A second
group pins the memory contract: at most one or two ``(B, B)`` float buffers, no ``(B, B)`` mask.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from deepmetric.distances import cosine_similarity, euclidean
from deepmetric.losses import (
    ArcFaceLoss,
    CircleLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    RankedListLoss,
    SoftTripleLoss,
    SupConLoss,
)
from deepmetric.losses._fused import label_groups
from deepmetric.losses._pairs import masked_logsumexp, resolve_masks
from deepmetric.losses._pairs import self_free_pair_masks as _masks
from deepmetric.losses.soft_triple import soft_triple_regularizer
from deepmetric.tuples import masks_to_pairs, zero_loss

D64 = torch.float64


# ------------------------------------------------------------------------------ autograd references
def ref_sup_con(x, y, indices=None, rx=None, ry=None, temperature=0.1):
    ref = x if rx is None else rx
    logits = cosine_similarity(x, rx) / temperature
    pos, neg = _masks(y, ry, indices, logits.shape[0], logits.shape[1])
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return zero_loss(x, ref)
    log_den, _ = masked_logsumexp(logits, pos | neg)
    pos_sum = torch.where(pos, logits, logits.new_zeros(())).sum(1)
    per = log_den - pos_sum / pos.sum(1).clamp_min(1).to(logits.dtype)
    return per[has_pos].mean()


def ref_circle(x, y, indices=None, rx=None, ry=None, m=0.4, gamma=80.0):
    ref = x if rx is None else rx
    sim = cosine_similarity(x, rx)
    pos, neg = _masks(y, ry, indices, sim.shape[0], sim.shape[1])
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return zero_loss(x, ref)
    a_p = F.relu(1.0 + m - sim.detach())
    a_n = F.relu(sim.detach() + m)
    lse = masked_logsumexp(-gamma * a_p * (sim - (1.0 - m)), pos)[0]
    lse = lse + masked_logsumexp(gamma * a_n * (sim - m), neg)[0]
    per = F.softplus(torch.where(valid, lse, lse.new_zeros(())))
    return per[valid].mean()


def ref_ranked_list(x, y, indices=None, rx=None, ry=None, alpha=1.2, margin=0.4, temperature=10.0,
                    negative_weight=1.0, query_only_gradient=False):
    q = F.normalize(x, dim=1)
    ref = q if rx is None else F.normalize(rx, dim=1)
    if query_only_gradient:
        ref = ref.detach()
    dist = euclidean(q, ref)
    pos, neg = _masks(y, ry, indices, dist.shape[0], dist.shape[1])
    if not bool(pos.any()):
        return zero_loss(x, ref)
    b = alpha - margin
    pos_star = pos & (dist > b)
    neg_star = neg & (dist < alpha)
    zero = dist.new_zeros(())
    loss_pos = torch.where(pos_star, dist - b, zero).sum(1) / pos_star.sum(1).clamp_min(1).to(dist.dtype)
    with torch.no_grad():
        logits = (temperature * (alpha - dist)).masked_fill(~neg_star, float("-inf"))
        has = neg_star.any(1, keepdim=True)
        w = torch.where(neg_star, torch.softmax(logits.masked_fill(~has, 0.0), dim=1), zero)
    loss_neg = (w * torch.where(neg_star, alpha - dist, zero)).sum(1)
    return (loss_pos + negative_weight * loss_neg).mean()


def ref_cos_face(x, y, w, scale, margin):
    logits = scale * (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T)
    logits = logits - scale * margin * F.one_hot(y, w.shape[0]).to(x.dtype)
    return F.cross_entropy(logits, y)


def ref_arc_face(x, y, w, scale, margin):
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    ct = cos.gather(1, y[:, None])
    sin = (1.0 - ct * ct).clamp_min(1e-12).sqrt()
    psi = torch.where(ct > math.cos(math.pi - margin), ct * math.cos(margin) - sin * math.sin(margin),
                      ct - margin * math.sin(margin))
    return F.cross_entropy(scale * cos.scatter(1, y[:, None], psi), y)


def ref_proxy_nca(x, y, p, s):
    logits = 2 * s * (F.normalize(x, dim=1) @ F.normalize(p, dim=1).T)
    target = logits.gather(1, y[:, None]).squeeze(1)
    return (torch.logsumexp(logits.scatter(1, y[:, None], float("-inf")), 1) - target).mean()


def ref_proxy_anchor(x, y, p, alpha, delta):
    cos = F.normalize(x, dim=1) @ F.normalize(p, dim=1).T
    onehot = F.one_hot(y, p.shape[0]).bool()
    zn = (alpha * (cos + delta)).masked_fill(onehot, float("-inf"))
    zp = (-alpha * (cos - delta)).masked_fill(~onehot, float("-inf"))
    zero = torch.zeros(1, p.shape[0], dtype=x.dtype)
    neg = torch.logsumexp(torch.cat([zero, zn]), 0)
    pos = torch.logsumexp(torch.cat([zero, zp]), 0)
    with_pos = onehot.any(0)
    return pos[with_pos].sum() / with_pos.sum() + neg.sum() / p.shape[0]


def ref_soft_triple(x, y, centers, la, gamma, tau, delta):
    c, k, d = centers.shape
    unit = F.normalize(centers, dim=2)
    sim = (F.normalize(x, dim=1) @ unit.reshape(c * k, d).T).view(-1, c, k)
    class_sim = (torch.softmax(sim / gamma, 2) * sim).sum(2)
    logits = la * class_sim - la * delta * F.one_hot(y, c).to(x.dtype)
    loss = F.cross_entropy(logits, y)
    return loss + tau * soft_triple_regularizer(centers) if tau > 0 and k > 1 else loss


# ---------------------------------------------------------------------------------------- helpers
def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value.detach(), [g.detach() for g in torch.autograd.grad(value, leaves, allow_unused=True)]


def _check(ours, ref, tensors, rtol=1e-7, atol=1e-9):
    (v1, g1), (v2, g2) = _grads(ours, *tensors), _grads(ref, *tensors)
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _batch(b, d=8, classes=4, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    y = (torch.arange(b) % classes)[torch.randperm(b, generator=g)]
    return x, y


def _f32_vs_f64(ours, ref, tensors, rtol=2e-4, atol=1e-5):
    """float32 fused against the float64 reference (the branches that only float32 takes)."""
    v1, g1 = _grads(ours, *[t.float() for t in tensors])
    v2, g2 = _grads(ref, *[t.double() for t in tensors])
    torch.testing.assert_close(v1.double(), v2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


LAYOUTS = [
    pytest.param(24, 6, id="balanced"),  # label fast path (gather / scatter per row)
    pytest.param(20, 7, id="uneven"),
    pytest.param(24, 2, id="two-classes"),  # K = 12 > max(B/8, 8): masked path
]


# ------------------------------------------------------------------------------------------ SupCon
@pytest.mark.parametrize("b, classes", LAYOUTS)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_sup_con_label_paths(b, classes, temperature):
    x, y = _batch(b, classes=classes, seed=b + classes)
    _check(lambda e: SupConLoss(temperature)(e, y), lambda e: ref_sup_con(e, y, temperature=temperature), [x])


@pytest.mark.parametrize("temperature", [0.03, 0.005])  # no shift; row maxima (1/τ beyond exp's range)
def test_sup_con_exponent_branches_float32(temperature):
    x, y = _batch(32, classes=8, seed=1)
    x[5] = x[4] * 1.5  # a duplicate direction
    _f32_vs_f64(lambda e: SupConLoss(temperature)(e, y), lambda e: ref_sup_con(e, y, temperature=temperature), [x],
                rtol=1e-3, atol=1e-4)


def test_sup_con_indices_ref_and_singletons():
    x, y = _batch(12, classes=5, seed=2)
    y[0] = 99  # a class of one: no positive
    r, ry = _batch(9, classes=5, seed=3)
    _check(lambda e, f: SupConLoss(0.2)(e, y, ref_embeddings=f, ref_labels=ry),
           lambda e, f: ref_sup_con(e, y, None, f, ry, 0.2), [x, r])
    pos, neg = resolve_masks(y, None, None, 12, 12)
    a1, p, a2, n = masks_to_pairs(pos, neg)
    keep = torch.arange(a2.numel()) % 3 == 0
    idx = (a1, p, a2[keep], n[keep])
    _check(lambda e: SupConLoss(0.2)(e, y, idx), lambda e: ref_sup_con(e, y, idx, temperature=0.2), [x])
    trip = (torch.tensor([1, 2, 3]), torch.tensor([6, 7, 8]), torch.tensor([0, 0, 4]))
    _check(lambda e: SupConLoss(0.2)(e, y, trip), lambda e: ref_sup_con(e, y, trip, temperature=0.2), [x])


# ------------------------------------------------------------------------------------------ Circle
@pytest.mark.parametrize("b, classes", LAYOUTS)
@pytest.mark.parametrize("m, gamma", [(0.4, 80.0), (0.25, 256.0), (0.0, 32.0), (-0.1, 16.0)])
def test_circle_label_paths(b, classes, m, gamma):
    x, y = _batch(b, classes=classes, seed=b * 7 + classes)
    _check(lambda e: CircleLoss(m=m, gamma=gamma)(e, y), lambda e: ref_circle(e, y, m=m, gamma=gamma), [x],
           rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("gamma", [80.0, 256.0])  # constant shift; row maxima (float32)
def test_circle_exponent_branches_float32(gamma):
    x, y = _batch(40, classes=8, seed=4)
    _f32_vs_f64(lambda e: CircleLoss(m=0.25, gamma=gamma)(e, y), lambda e: ref_circle(e, y, m=0.25, gamma=gamma),
                [x], rtol=2e-3, atol=1e-4)


def test_circle_indices_and_ref():
    x, y = _batch(10, classes=3, seed=5)
    r, ry = _batch(7, classes=4, seed=6)
    _check(lambda e, f: CircleLoss()(e, y, ref_embeddings=f, ref_labels=ry),
           lambda e, f: ref_circle(e, y, None, f, ry), [x, r], rtol=1e-6, atol=1e-8)
    idx = (torch.tensor([0, 3, 4]), torch.tensor([3, 0, 7]), torch.tensor([0, 0, 4, 5]), torch.tensor([1, 2, 0, 1]))
    _check(lambda e: CircleLoss()(e, y, idx), lambda e: ref_circle(e, y, idx), [x], rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------- ranked list
@pytest.mark.parametrize("b, classes", LAYOUTS)
@pytest.mark.parametrize("temperature, negative_weight", [(10.0, 1.0), (0.0, 1.0), (5.0, 0.0), (3.0, -0.5)])
def test_ranked_list_label_paths(b, classes, temperature, negative_weight):
    x, y = _batch(b, d=3, classes=classes, seed=b + 3 * classes)
    kw = dict(alpha=1.4, margin=0.5, temperature=temperature, negative_weight=negative_weight)
    _check(lambda e: RankedListLoss(**kw)(e, y), lambda e: ref_ranked_list(e, y, **kw), [x])


def test_ranked_list_query_only_zero_rows_and_duplicates():
    x, y = _batch(24, d=3, classes=6, seed=7)
    x[3] = 0.0  # a zero row (exact d² from the norms)
    x[7] = x[8] * 2.0 + 1e-9 * torch.randn(3, dtype=D64, generator=torch.Generator().manual_seed(0))
    # ^ a near-duplicate direction: the squared distance is clamped, no gradient through it
    for qo in (False, True):
        kw = dict(alpha=1.6, margin=0.3, temperature=4.0, query_only_gradient=qo)
        _check(lambda e: RankedListLoss(**kw)(e, y), lambda e: ref_ranked_list(e, y, **kw), [x])
    z = x.clone()
    z[3] = torch.randn(3, dtype=D64)
    y2 = y.clone()
    y2[8] = (y2[7] + 1) % 6  # duplicates with different labels: a clamped negative
    kw = dict(alpha=1.6, margin=0.3, temperature=4.0)
    _check(lambda e: RankedListLoss(**kw)(e, y2), lambda e: ref_ranked_list(e, y2, **kw), [z])


def test_ranked_list_large_temperature_float32():
    x, y = _batch(32, d=4, classes=8, seed=8)
    kw = dict(alpha=1.3, margin=0.4, temperature=90.0)  # T α beyond exp's range: row maxima
    _f32_vs_f64(lambda e: RankedListLoss(**kw)(e, y), lambda e: ref_ranked_list(e, y, **kw), [x],
                rtol=1e-3, atol=1e-4)


def test_ranked_list_indices_and_ref():
    x, y = _batch(10, d=3, classes=3, seed=9)
    r, ry = _batch(8, d=3, classes=3, seed=10)
    kw = dict(alpha=1.5, temperature=6.0)
    _check(lambda e, f: RankedListLoss(**kw)(e, y, ref_embeddings=f, ref_labels=ry),
           lambda e, f: ref_ranked_list(e, y, None, f, ry, **kw), [x, r])
    idx = (torch.tensor([0, 3, 1]), torch.tensor([3, 0, 4]), torch.tensor([0, 2, 5]))
    _check(lambda e: RankedListLoss(**kw)(e, y, idx), lambda e: ref_ranked_list(e, y, idx, **kw), [x])


# ------------------------------------------------------------------------------------ row blocks
@pytest.mark.parametrize("module_name", ["circle", "ranked_list"])
def test_row_blocks_give_the_same_loss(module_name, monkeypatch):
    """Circle and ranked list walk the negatives in row blocks (32 rows at least here: 3 blocks)."""
    import importlib

    module = importlib.import_module(f"deepmetric.losses.{module_name}")
    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 1)
    x, y = _batch(80, d=5, classes=10, seed=18)
    if module_name == "circle":
        _check(lambda e: CircleLoss(m=0.3, gamma=64.0)(e, y), lambda e: ref_circle(e, y, m=0.3, gamma=64.0), [x],
               rtol=1e-6, atol=1e-8)
        _check(lambda e: CircleLoss(m=0.0, gamma=8.0)(e, y), lambda e: ref_circle(e, y, m=0.0, gamma=8.0), [x],
               rtol=1e-6, atol=1e-8)
        _f32_vs_f64(lambda e: CircleLoss(m=0.25, gamma=256.0)(e, y),
                    lambda e: ref_circle(e, y, m=0.25, gamma=256.0), [x], rtol=2e-3, atol=1e-4)
    else:
        x[9] = x[10] * 3.0 + 1e-9  # a clamped distance inside a later block
        for kw in (dict(alpha=1.5, temperature=8.0), dict(alpha=1.5, temperature=0.0, negative_weight=0.0)):
            _check(lambda e: RankedListLoss(**kw)(e, y), lambda e: ref_ranked_list(e, y, **kw), [x])
        kw = dict(alpha=1.3, margin=0.4, temperature=90.0)
        _f32_vs_f64(lambda e: RankedListLoss(**kw)(e, y), lambda e: ref_ranked_list(e, y, **kw), [x],
                    rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------- proxy losses
def _proxy_batch(b=18, c=5, d=6, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=D64)
    y = torch.randint(0, c, (b,), generator=g)
    w = torch.randn(c, d, generator=g, dtype=D64)
    return x, y, w


@pytest.mark.parametrize("scale, margin", [(64.0, 0.35), (4.0, 0.0), (30.0, 1.2)])
def test_cos_face_fused(scale, margin):
    x, y, w = _proxy_batch()
    mod = CosFaceLoss(num_classes=5, embedding_dim=6, scale=scale, margin=margin).double()
    v, (gx,) = _grads(lambda e: mod(e, y), x)
    (gw,) = torch.autograd.grad(mod(x, y), [mod.weight])
    rv, (rgx, rgw) = _grads(lambda e, ww: ref_cos_face(e, y, ww, scale, margin), x, mod.weight.detach())
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


@pytest.mark.parametrize("margin", [0.5, 2.5])  # 2.5 rad: many targets on the cos θ − m sin m branch
def test_arc_face_fused(margin):
    x, y, w = _proxy_batch(seed=12)
    x[0] = w[y[0]] * 3.0  # θ = 0: the sin θ clamp
    _check(lambda e, ww: _arc(e, y, ww, margin),
           lambda e, ww: ref_arc_face(e, y, ww, 64.0, margin), [x, w], rtol=1e-6, atol=1e-8)


def _arc(e, y, w, margin):
    from deepmetric.losses.arc_face import arc_face_loss

    return arc_face_loss(e, y, w, 64.0, margin)


def test_norm_softmax_and_proxy_nca_fused():
    from deepmetric.losses.norm_softmax import norm_softmax_loss
    from deepmetric.losses.proxy_nca import proxy_nca_loss

    x, y, w = _proxy_batch(seed=13)
    _check(lambda e, ww: norm_softmax_loss(e, y, ww, 0.05),
           lambda e, ww: F.cross_entropy(F.normalize(e, dim=1) @ F.normalize(ww, dim=1).T / 0.05, y), [x, w])
    for s in (1.0, 8.0):
        _check(lambda e, ww: proxy_nca_loss(e, y, ww, s), lambda e, ww: ref_proxy_nca(e, y, ww, s), [x, w])


@pytest.mark.parametrize("alpha, delta", [(32.0, 0.1), (4.0, -0.2)])
def test_proxy_anchor_fused(alpha, delta):
    from deepmetric.losses.proxy_anchor import proxy_anchor_loss

    x, y, w = _proxy_batch(c=7, seed=14)  # some proxies without positives
    _check(lambda e, ww: proxy_anchor_loss(e, y, ww, alpha, delta),
           lambda e, ww: ref_proxy_anchor(e, y, ww, alpha, delta), [x, w])


@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_soft_triple_fused(tau):
    from deepmetric.losses.soft_triple import soft_triple_loss

    x, y, _ = _proxy_batch(seed=15)
    centers = torch.randn(5, 3, 6, dtype=D64)
    _check(lambda e, c: soft_triple_loss(e, y, c, 20.0, 0.1, tau, 0.01),
           lambda e, c: ref_soft_triple(e, y, c, 20.0, 0.1, tau, 0.01), [x, centers])


def test_soft_triple_small_gamma_float32():
    from deepmetric.losses.soft_triple import soft_triple_loss

    x, y, _ = _proxy_batch(b=32, seed=19)
    centers = torch.randn(5, 4, 6, dtype=D64)
    for gamma in (0.1, 0.004):  # 1/γ = 250: beyond exp's float32 range, shifted per class
        _f32_vs_f64(lambda e, c: soft_triple_loss(e, y, c, 20.0, gamma, 0.0, 0.01),
                    lambda e, c: ref_soft_triple(e, y, c, 20.0, gamma, 0.0, 0.01), [x, centers], rtol=1e-3, atol=1e-4)


def test_proxy_losses_float32_match_float64():
    x, y, w = _proxy_batch(b=64, c=16, d=32, seed=16)
    from deepmetric.losses.arc_face import arc_face_loss
    from deepmetric.losses.cos_face import cos_face_loss
    from deepmetric.losses.proxy_anchor import proxy_anchor_loss

    for ours, ref in [
        (lambda e, ww: cos_face_loss(e, y, ww, 64.0, 0.35), lambda e, ww: ref_cos_face(e, y, ww, 64.0, 0.35)),
        (lambda e, ww: arc_face_loss(e, y, ww, 64.0, 0.5), lambda e, ww: ref_arc_face(e, y, ww, 64.0, 0.5)),
        (lambda e, ww: proxy_anchor_loss(e, y, ww, 32.0, 0.1), lambda e, ww: ref_proxy_anchor(e, y, ww, 32.0, 0.1)),
    ]:
        _f32_vs_f64(ours, ref, [x, w], rtol=1e-3, atol=1e-5)


def test_no_grad_and_module_parameters():
    x, y, _ = _proxy_batch(seed=17)
    for mod in (ArcFaceLoss(num_classes=5, embedding_dim=6), CosFaceLoss(num_classes=5, embedding_dim=6),
                NormSoftmaxLoss(num_classes=5, embedding_dim=6), ProxyNCALoss(num_classes=5, embedding_dim=6),
                ProxyAnchorLoss(num_classes=5, embedding_dim=6), SoftTripleLoss(num_classes=5, embedding_dim=6)):
        mod = mod.double()
        with torch.no_grad():
            value = mod(x, y)
        assert value.grad_fn is None and torch.isfinite(value)
        loss = mod(x, y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())
    xb, yb = _batch(16, classes=4)
    for mod in (SupConLoss(), CircleLoss(), RankedListLoss()):
        with torch.no_grad():
            assert mod(xb, yb).grad_fn is None


def test_label_groups_table():
    y = torch.tensor([5, 1, 5, 5, 2, 1, 9])
    groups = label_groups(y)
    assert groups is not None
    for i in range(7):
        members = set(groups.members[i].tolist())
        assert members == {j for j in range(7) if int(y[j]) == int(y[i])}
        positives = {int(j) for j, ok in zip(groups.members[i], groups.pos_slots[i]) if ok}
        assert positives == {j for j in range(7) if int(y[j]) == int(y[i]) and j != i}
        assert int(groups.num_pos[i]) == len(positives)
    assert label_groups(torch.tensor([0] * 12 + [1] * 4)) is None  # one class beyond B/8 (and > 8)


# --------------------------------------------------------------------------------- memory contract
def _square_allocations(fn, b, itemsize):
    with profile(profile_memory=True) as prof:
        fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events()
             if e.name.startswith("aten::") and e.self_cpu_memory_usage >= b * b]
    return sum(1 for s in sizes if s >= b * b * itemsize), len(sizes)


@pytest.mark.parametrize("name, floats", [("sup_con", 1), ("circle", 2), ("ranked_list", 2)])
def test_fused_batch_losses_allocate_at_most_two_square_buffers(name, floats):
    from deepmetric.losses import build

    b = 256
    x = torch.randn(b, 16, requires_grad=True)
    y = torch.arange(b) % 32
    loss_fn = build(name)
    loss_fn(x, y).backward()  # warm-up
    n_float, n_any = _square_allocations(lambda: loss_fn(x, y).backward(), b, 4)
    assert n_float <= floats, (name, n_float)
    assert n_any == n_float, f"{name}: a (B, B) mask or index tensor was allocated"
