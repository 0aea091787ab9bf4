"""Center/cluster and proxy/classification losses: references, gradients, PML parity, contracts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.errors import ConfigError, DataError
from deepmetric.losses import (
    ArcFaceLoss,
    CenterLoss,
    CosFaceLoss,
    CoupledClustersLoss,
    FacilityLocationLoss,
    NormSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftmaxLoss,
    SoftTripleLoss,
    TripletCenterLoss,
    build,
)
from deepmetric.losses.arc_face import arc_face_loss
from deepmetric.losses.center import center_loss, center_update
from deepmetric.losses.coupled_clusters import coupled_clusters_loss
from deepmetric.losses.cos_face import cos_face_loss
from deepmetric.losses.facility_location import (
    facility_location_loss,
    loss_augmented_medoids,
    normalized_mutual_info,
)
from deepmetric.losses.norm_softmax import norm_softmax_loss
from deepmetric.losses.proxy_anchor import proxy_anchor_loss
from deepmetric.losses.proxy_nca import proxy_nca_loss
from deepmetric.losses.soft_triple import soft_triple_loss, soft_triple_regularizer
from deepmetric.losses.triplet_center import triplet_center_loss
from deepmetric.distances import euclidean
from reference import ref_losses_proxy as ref

D64 = torch.float64
C, D = 5, 6

# name -> (class, extra kwargs, parameter attribute names)
PARAMETRIC = {
    "softmax": (SoftmaxLoss, {}, ["weight", "bias"]),
    "center": (CenterLoss, {}, ["weight", "bias"]),
    "triplet_center": (TripletCenterLoss, {}, ["centers", "weight", "bias"]),
    "proxy_nca": (ProxyNCALoss, {}, ["proxies"]),
    "proxy_anchor": (ProxyAnchorLoss, {}, ["proxies"]),
    "norm_softmax": (NormSoftmaxLoss, {}, ["proxies"]),
    "soft_triple": (SoftTripleLoss, {"centers_per_class": 3}, ["centers"]),
    "cos_face": (CosFaceLoss, {}, ["weight"]),
    "arc_face": (ArcFaceLoss, {}, ["weight"]),
}
FREE = {"coupled_clusters": CoupledClustersLoss, "facility_location": FacilityLocationLoss}


def _batch(
    b: int = 10, num_classes: int = C, dim: int = D, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, dim, generator=g, dtype=D64)
    y = torch.arange(b) % num_classes
    y = y[torch.randperm(b, generator=g)]
    return x, y


def _build(name: str) -> torch.nn.Module:
    if name in FREE:
        return FREE[name]()
    cls, kwargs, _ = PARAMETRIC[name]
    return cls(num_classes=C, embedding_dim=D, **kwargs).double()


def _compare(fn_fast, fn_ref, tensors: list[torch.Tensor], atol: float = 1e-9) -> None:
    """Values and gradients (w.r.t. every tensor) of two float64 functions agree."""
    a = [t.detach().clone().requires_grad_(True) for t in tensors]
    b = [t.detach().clone().requires_grad_(True) for t in tensors]
    out_a, out_b = fn_fast(*a), fn_ref(*b)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-7)
    grads_a = torch.autograd.grad(out_a, a, allow_unused=True)
    grads_b = torch.autograd.grad(out_b, b, allow_unused=True)
    for t, ga, gb in zip(a, grads_a, grads_b):
        ga = torch.zeros_like(t) if ga is None else ga
        gb = torch.zeros_like(t) if gb is None else gb
        torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-6)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    w, b = torch.randn(C, D, dtype=D64), torch.randn(C, dtype=D64)
    from deepmetric.losses.softmax import softmax_loss

    _compare(
        lambda x_, w_, b_: softmax_loss(x_, y, w_, b_),
        lambda x_, w_, b_: ref.ref_softmax(x_, y, w_, b_),
        [x, w, b],
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_center_loss_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    centers = torch.randn(C, D, dtype=D64)
    _compare(lambda x_, c_: center_loss(x_, y, c_), lambda x_, c_: ref.ref_center(x_, y, c_), [x, centers])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_center_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    centers = torch.randn(C, D, dtype=D64)
    margin = 2.0  # some hinges active, some not
    _compare(
        lambda x_, c_: triplet_center_loss(x_, y, c_, margin),
        lambda x_, c_: ref.ref_triplet_center(x_, y, c_, margin),
        [x, centers],
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coupled_clusters_matches_reference(seed: int) -> None:
    x, y = _batch(b=12, num_classes=4, seed=seed)
    y = y * 7 + 3  # arbitrary label values
    _compare(
        lambda x_: coupled_clusters_loss(x_, y, 1.0), lambda x_: ref.ref_coupled_clusters(x_, y, 1.0), [x]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_nca_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    p = torch.randn(C, D, dtype=D64)
    for s in (1.0, 3.0):
        _compare(
            lambda x_, p_: proxy_nca_loss(x_, y, p_, s),
            lambda x_, p_: ref.ref_proxy_nca(x_, y, p_, s),
            [x, p],
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_anchor_matches_reference(seed: int) -> None:
    x, y = _batch(b=7, num_classes=C, seed=seed)
    y = y.clamp(max=3)  # class 4 has no positive in the batch: only its negative term counts
    p = torch.randn(C, D, dtype=D64)
    _compare(
        lambda x_, p_: proxy_anchor_loss(x_, y, p_, 32.0, 0.1),
        lambda x_, p_: ref.ref_proxy_anchor(x_, y, p_, 32.0, 0.1),
        [x, p],
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_norm_softmax_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    p = torch.randn(C, D, dtype=D64)
    _compare(
        lambda x_, p_: norm_softmax_loss(x_, y, p_, 0.05),
        lambda x_, p_: ref.ref_norm_softmax(x_, y, p_, 0.05),
        [x, p],
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_cos_face_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    w = torch.randn(C, D, dtype=D64)
    _compare(
        lambda x_, w_: cos_face_loss(x_, y, w_, 64.0, 0.35),
        lambda x_, w_: ref.ref_cos_face(x_, y, w_, 64.0, 0.35),
        [x, w],
        atol=1e-8,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_arc_face_matches_reference_both_branches(seed: int) -> None:
    x, y = _batch(seed=seed)
    w = torch.randn(C, D, dtype=D64)
    # Sample 0 points almost opposite to its class weight: theta + m > pi (second branch).
    x[0] = -w[y[0]] + 0.05 * torch.randn(D, dtype=D64)
    cos0 = F.cosine_similarity(x[0], w[y[0]], dim=0)
    assert math.acos(float(cos0)) + 0.5 > math.pi
    _compare(
        lambda x_, w_: arc_face_loss(x_, y, w_, 64.0, 0.5),
        lambda x_, w_: ref.ref_arc_face(x_, y, w_, 64.0, 0.5),
        [x, w],
        atol=1e-8,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_triple_matches_reference(seed: int) -> None:
    x, y = _batch(b=6, num_classes=3, seed=seed)
    centers = torch.randn(3, 4, D, dtype=D64)
    _compare(
        lambda x_, c_: soft_triple_loss(x_, y, c_, 20.0, 0.1, 0.2, 0.01),
        lambda x_, c_: ref.ref_soft_triple(x_, y, c_, 20.0, 0.1, 0.2, 0.01),
        [x, centers],
    )
    _compare(soft_triple_regularizer, ref.ref_soft_triple_regularizer, [centers])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pam", [0, 2])
def test_facility_location_matches_reference(seed: int, pam: int) -> None:
    x, y = _batch(b=9, num_classes=3, seed=seed)
    x = F.normalize(x, dim=1)
    gamma = 2.0
    loss_ref, medoids_ref = ref.ref_facility_location(x, y, gamma, pam)
    dist = euclidean(x).masked_fill(torch.eye(9, dtype=torch.bool), 0.0)
    medoids = loss_augmented_medoids(dist, y, gamma, pam)
    assert medoids.tolist() == medoids_ref
    assert float(loss_ref) > 0  # away from the hinge
    _compare(
        lambda x_: facility_location_loss(x_, y, gamma, pam),
        lambda x_: ref.ref_facility_location(x_, y, gamma, pam)[0],
        [x],
    )


def test_nmi_is_exact() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randint(0, 4, (30,), generator=g)
        b = torch.randint(0, 6, (30,), generator=g) * 10
        expected = sklearn_metrics.normalized_mutual_info_score(a, b, average_method="geometric")
        assert normalized_mutual_info(a, b) == pytest.approx(expected, abs=1e-12)
        assert normalized_mutual_info(a, b) == pytest.approx(ref.ref_nmi(a.tolist(), b.tolist()), abs=1e-12)
    same = torch.tensor([0, 0, 1, 1, 2])
    assert normalized_mutual_info(same, same * 3 + 1) == pytest.approx(1.0)
    assert normalized_mutual_info(same, torch.zeros(5, dtype=torch.long)) == 0.0


def test_facility_location_zero_for_perfect_clusters() -> None:
    # Tight, far-apart clusters: the true medoids are optimal and NMI = 1, so the loss is 0 ...
    centers = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]], dtype=D64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    x = centers[y] + 0.01 * torch.randn(9, 2, dtype=D64)
    assert float(facility_location_loss(x, y, gamma=1.0)) == pytest.approx(0.0, abs=1e-12)
    # ... while mixed-up classes give a positive loss.
    assert float(facility_location_loss(x, y[torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])], gamma=1.0)) > 0


# ----------------------------------------------------------------------------- center update


def test_center_update_by_hand() -> None:
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=D64)
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0], [3.0, 3.0]], dtype=D64)
    y = torch.tensor([0, 0, 1])
    # class 0: sum (c0 - x_i) = (-2, -4), n = 2 -> delta = (-2/3, -4/3); c0 - 0.5 delta = (1/3, 2/3)
    # class 1: (1 - 3, 1 - 3) / 2 = (-1, -1) -> c1 = (1.5, 1.5); class 2 absent: unchanged
    expected = torch.tensor([[1 / 3, 2 / 3], [1.5, 1.5], [5.0, 5.0]], dtype=D64)
    torch.testing.assert_close(center_update(centers, x, y, 0.5), expected)
    torch.testing.assert_close(ref.ref_center_update(centers, x, y, 0.5), expected)


def test_center_module_updates_buffer_only_in_training() -> None:
    loss_fn = CenterLoss(num_classes=3, embedding_dim=2, lambda_c=0.5).double()
    start = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=D64)
    loss_fn.centers.copy_(start)
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0], [3.0, 3.0]], dtype=D64, requires_grad=True)
    y = torch.tensor([0, 0, 1])
    assert "centers" in dict(loss_fn.named_buffers())
    assert "centers" not in dict(loss_fn.named_parameters())
    loss_fn.eval()
    loss_eval = loss_fn(x, y)
    torch.testing.assert_close(loss_fn.centers, start)  # no update in eval mode
    loss_fn.train()
    loss_train = loss_fn(x, y)  # the loss uses the centers *before* this step's update
    torch.testing.assert_close(loss_train, loss_eval)
    torch.testing.assert_close(loss_fn.centers, ref.ref_center_update(start, x.detach(), y, 0.5))
    softmax_term = F.cross_entropy(F.linear(x, loss_fn.weight, loss_fn.bias), y)
    expected = softmax_term + 0.5 * ref.ref_center(x, y, start)
    torch.testing.assert_close(loss_eval, expected)
    loss_train.backward()
    torch.testing.assert_close(
        x.grad,
        torch.autograd.grad(expected, x)[0],
    )


def test_center_without_softmax_is_weighted_center_term() -> None:
    loss_fn = CenterLoss(num_classes=C, embedding_dim=D, with_softmax=False, lambda_c=2.0).double().eval()
    x, y = _batch()
    torch.testing.assert_close(loss_fn(x, y), 2.0 * ref.ref_center(x, y, loss_fn.centers))
    assert not list(loss_fn.parameters())


def test_triplet_center_with_softmax_adds_weighted_cross_entropy() -> None:
    loss_fn = TripletCenterLoss(num_classes=C, embedding_dim=D, margin=2.0, lambda_softmax=0.3).double()
    x, y = _batch()
    expected = ref.ref_triplet_center(x, y, loss_fn.centers, 2.0) + 0.3 * ref.ref_softmax(
        x, y, loss_fn.weight, loss_fn.bias
    )
    torch.testing.assert_close(loss_fn(x, y), expected)


# ----------------------------------------------------------------------------- gradcheck


GRADCHECK_FNS = {
    "triplet_center": lambda x, p, y: triplet_center_loss(x, y, p, 1.0),
    "proxy_nca": lambda x, p, y: proxy_nca_loss(x, y, p, 1.0),
    "proxy_anchor": lambda x, p, y: proxy_anchor_loss(x, y, p, 4.0, 0.1),
    "norm_softmax": lambda x, p, y: norm_softmax_loss(x, y, p, 0.5),
    "cos_face": lambda x, p, y: cos_face_loss(x, y, p, 4.0, 0.35),
    "arc_face": lambda x, p, y: arc_face_loss(x, y, p, 4.0, 0.5),
    "soft_triple": lambda x, p, y: soft_triple_loss(x, y, p.view(3, 2, 3), 2.0, 0.5, 0.2, 0.01),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_FNS))
def test_gradcheck(name: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, dtype=D64, generator=g, requires_grad=True)
    rows = 6 if name == "soft_triple" else 3
    p = torch.randn(rows, 3, dtype=D64, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    assert torch.autograd.gradcheck(lambda a, b: GRADCHECK_FNS[name](a, b, y), (x, p))


def test_gradcheck_cluster_losses() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, dtype=D64, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda a: coupled_clusters_loss(a, y, 1.0), (x,))
    assert float(facility_location_loss(x.detach(), y, 1.0)) > 0
    assert torch.autograd.gradcheck(lambda a: facility_location_loss(a, y, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda a: center_loss(a, y, torch.zeros(3, 3, dtype=D64)), (x,))


# ----------------------------------------------------------------------------- PML parity


def _pml_losses():
    return pytest.importorskip("pytorch_metric_learning.losses")


def test_pml_proxy_nca_under_mapping() -> None:
    losses = _pml_losses()
    from pytorch_metric_learning.reducers import DoNothingReducer

    x, y = _batch(b=16)
    ours = ProxyNCALoss(num_classes=C, embedding_dim=D, softmax_scale=2.0).double()
    pml = losses.ProxyNCALoss(C, D, softmax_scale=2.0, reducer=DoNothingReducer())
    pml.proxies.data = ours.proxies.detach().clone()
    out = pml(x, y)["loss"]  # positive kept in the denominator; one term per sample
    assert out["indices"].tolist() == list(range(16))
    per_sample_pml = out["losses"]
    # Removing the positive from the denominator: L = L_pml + log(1 - exp(-L_pml)), per sample.
    mapped = (per_sample_pml + torch.log1p(-torch.exp(-per_sample_pml))).mean()
    torch.testing.assert_close(ours(x, y), mapped)


def test_pml_proxy_anchor() -> None:
    losses = _pml_losses()
    x, y = _batch(b=16)
    y[y == 4] = 0  # a proxy without positives
    ours = ProxyAnchorLoss(num_classes=C, embedding_dim=D, alpha=32.0, delta=0.1).double()
    pml = losses.ProxyAnchorLoss(C, D, margin=0.1, alpha=32)
    pml.proxies.data = ours.proxies.detach().clone()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la, lb = ours(xa, y), pml(xb, y)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad)


@pytest.mark.parametrize(
    "name",
    ["norm_softmax", "cos_face", "arc_face"],
)
def test_pml_classifier_losses(name: str) -> None:
    losses = _pml_losses()
    x, y = _batch(b=16)
    if name == "norm_softmax":
        ours = NormSoftmaxLoss(num_classes=C, embedding_dim=D, temperature=0.05).double()
        pml = losses.NormalizedSoftmaxLoss(C, D, temperature=0.05)
        ours_param = ours.proxies
    elif name == "cos_face":
        ours = CosFaceLoss(num_classes=C, embedding_dim=D, scale=64.0, margin=0.35).double()
        pml = losses.CosFaceLoss(C, D, margin=0.35, scale=64)
        ours_param = ours.weight
    else:
        ours = ArcFaceLoss(num_classes=C, embedding_dim=D, scale=64.0, margin=0.5).double()
        pml = losses.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=64)  # PML: degrees
        ours_param = ours.weight
    ours_param.data = torch.randn(C, D, dtype=D64)
    pml.W.data = ours_param.detach().T.clone()  # PML stores W as (embedding_dim, num_classes)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la, lb = ours(xa, y), pml(xb, y)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours_param.grad, pml.W.grad.T)


def test_pml_soft_triple_with_tau_zero() -> None:
    losses = _pml_losses()
    x, y = _batch(b=16)
    ours = SoftTripleLoss(num_classes=C, embedding_dim=D, tau=0.0).double()
    pml = losses.SoftTripleLoss(C, D, centers_per_class=10, la=20, gamma=0.1, margin=0.01)
    pml.fc.data = ours.centers.detach().reshape(C * 10, D).T.clone()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la, lb = ours(xa, y), pml(xb, y)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.centers.grad.reshape(C * 10, D), pml.fc.grad.T)
    # with the regulariser, the difference is exactly tau * R
    ours.tau = 0.2
    torch.testing.assert_close(ours(x, y) - pml(x, y), 0.2 * ref.ref_soft_triple_regularizer(ours.centers))


# ----------------------------------------------------------------------------- contracts


ALL = sorted(PARAMETRIC) + sorted(FREE)


@pytest.mark.parametrize("name", ALL)
def test_registered_with_class_attributes(name: str) -> None:
    loss_fn = _build(name)
    assert type(loss_fn).tuple_kind is None
    assert type(loss_fn).label_kind == "class"
    kwargs = {} if name in FREE else {"num_classes": C, "embedding_dim": D}
    assert type(build(name, **kwargs)) is type(loss_fn)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_finite_and_gradients_reach_parameters(name: str, dtype: torch.dtype) -> None:
    loss_fn = _build(name).float()  # parameters float32 even for float64 input
    x, y = _batch(b=10)
    x = x.to(dtype).requires_grad_(True)
    loss = loss_fn(x, y)
    assert loss.dtype == dtype and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if name in PARAMETRIC:
        for attr in PARAMETRIC[name][2]:
            grad = getattr(loss_fn, attr).grad
            assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", sorted(PARAMETRIC))
def test_label_out_of_range_is_named(name: str) -> None:
    loss_fn = _build(name)
    x, _ = _batch(b=4)
    with pytest.raises(DataError, match="label 7"):
        loss_fn(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(DataError, match="label -1"):
        loss_fn(x, torch.tensor([0, -1, 1, 2]))


@pytest.mark.parametrize("name", ALL)
def test_rejects_tuples_references_and_float_labels(name: str) -> None:
    loss_fn = _build(name)
    x, y = _batch(b=4)
    idx = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    with pytest.raises(DataError, match="mined"):
        loss_fn(x, y, indices=idx)
    with pytest.raises(DataError, match="ref_embeddings"):
        loss_fn(x, y, ref_embeddings=x, ref_labels=y)
    with pytest.raises(DataError, match="integer"):
        loss_fn(x, y.to(D64))
    with pytest.raises(DataError):
        loss_fn(x[:, :3] if name in PARAMETRIC else x[:3], y)


def test_bad_configuration_raises() -> None:
    with pytest.raises(ConfigError):
        ProxyNCALoss(num_classes=1, embedding_dim=4)
    with pytest.raises(ConfigError):
        SoftmaxLoss(num_classes=0, embedding_dim=4)
    with pytest.raises(ConfigError):
        CenterLoss(num_classes=3, embedding_dim=4, alpha=1.5)
    with pytest.raises(ConfigError):
        ArcFaceLoss(num_classes=3, embedding_dim=4, margin=4.0)
    with pytest.raises(ConfigError):
        build("cos_face", num_classes=3, embedding_dim=4, temperature=1.0)


def test_single_class_batch_gives_zero_with_graph() -> None:
    x = torch.randn(4, D, dtype=D64, requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    for loss_fn in (CoupledClustersLoss(), FacilityLocationLoss()):
        loss = loss_fn(x, y)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_paper_defaults() -> None:
    center = CenterLoss(num_classes=2, embedding_dim=2)
    assert (center.lambda_c, center.alpha, center.with_softmax) == (0.003, 0.5, True)
    pa = ProxyAnchorLoss(num_classes=2, embedding_dim=2)
    assert (pa.alpha, pa.delta) == (32.0, 0.1)
    st = SoftTripleLoss(num_classes=2, embedding_dim=2)
    assert (st.centers_per_class, st.la, st.gamma, st.tau, st.delta) == (10, 20.0, 0.1, 0.2, 0.01)
    assert NormSoftmaxLoss(num_classes=2, embedding_dim=2).temperature == 0.05
    cos_face = CosFaceLoss(num_classes=2, embedding_dim=2)
    assert (cos_face.scale, cos_face.margin) == (64.0, 0.35)
    arc_face = ArcFaceLoss(num_classes=2, embedding_dim=2)
    assert (arc_face.scale, arc_face.margin) == (64.0, 0.5)
    assert ProxyNCALoss(num_classes=2, embedding_dim=2).softmax_scale == 1.0
    assert CoupledClustersLoss().alpha == 1.0


def test_training_reduces_proxy_anchor_loss() -> None:
    # A few optimizer steps on fixed embeddings must lower the loss (proxies move to their classes).
    x, y = _batch(b=20)
    loss_fn = ProxyAnchorLoss(num_classes=C, embedding_dim=D).double()
    first = float(loss_fn(x, y).detach())
    for _ in range(20):
        (grad,) = torch.autograd.grad(loss_fn(x, y), [loss_fn.proxies])
        with torch.no_grad():
            loss_fn.proxies -= 0.1 * grad
    assert float(loss_fn(x, y).detach()) < first - 0.1
