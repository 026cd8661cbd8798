import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp

from metadistil_scale.models.cifar import CV_MODELS, build_cv_model, count_parameters

ALL_MODELS = list(CV_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shapes_cifar_and_fashion_mnist(name: str) -> None:
    torch.manual_seed(0)
    cifar = build_cv_model(name, num_classes=100)
    assert cifar(pixel_values=torch.randn(2, 3, 32, 32)).shape == (2, 100)
    fmnist = build_cv_model(name, num_classes=10, in_channels=1).eval()
    out = fmnist(pixel_values=torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown CV model 'resnet9'.*resnet8.*wrn_40_2.*vgg13"):
        build_cv_model("resnet9", num_classes=10)


# Published parameter counts, in millions, with the number of classes they were counted at.
# - num_classes=10: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Table 6 (CIFAR-10).
#   Their CIFAR shortcuts are parameter-free; our 1x1-conv shortcuts add 2,752 parameters (well inside 3%).
# - num_classes=100: the counts quoted for RepDistiller's CIFAR-100 zoo (Tian et al., CRD, ICLR 2020; code at
#   github.com/HobbitLong/RepDistiller, models/resnet.py, wrn.py, vgg.py), which our definitions reproduce
#   layer for layer (VGG without the conv biases that BatchNorm cancels: 1,472 fewer parameters for vgg8).
#   resnet20 is 0.28M at 100 classes (0.27M is its CIFAR-10 figure above, plus 90 x 65 head parameters).
PUBLISHED = [
    ("resnet20", 10, 0.27),
    ("resnet32", 10, 0.46),
    ("resnet44", 10, 0.66),
    ("resnet56", 10, 0.85),
    ("resnet110", 10, 1.7),
    ("resnet8", 100, 0.08),
    ("resnet20", 100, 0.28),
    ("resnet32", 100, 0.47),
    ("resnet56", 100, 0.86),
    ("resnet110", 100, 1.73),
    ("resnet8x4", 100, 1.23),
    ("resnet32x4", 100, 7.43),
    ("wrn_16_2", 100, 0.70),
    ("wrn_40_1", 100, 0.57),
    ("wrn_40_2", 100, 2.26),
    ("vgg8", 100, 3.96),
    ("vgg13", 100, 9.46),
]


@pytest.mark.parametrize(("name", "num_classes", "millions"), PUBLISHED)
def test_parameter_counts_match_published(name: str, num_classes: int, millions: float) -> None:
    count = count_parameters(build_cv_model(name, num_classes=num_classes))
    published = millions * 1e6
    # A figure printed as 0.08M only says 0.075M-0.085M: allow half a unit of its last digit, or 3%.
    decimals = len(f"{millions}".split(".")[1])
    tolerance = max(0.03 * published, 0.5 * 10 ** (6 - decimals))
    assert abs(count - published) <= tolerance, f"{name}: {count} parameters vs published {millions}M"


def _functional(model: torch.nn.Module, x: torch.Tensor):
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def logits(params: dict[str, torch.Tensor]) -> torch.Tensor:
        # Buffers are copied inside the transformed function: train-mode BatchNorm updates its running
        # statistics in place, which torch.func refuses on captured tensors, and the copies leave the
        # module's own statistics untouched.
        return functional_call(
            model, (params, {k: v.clone() for k, v in buffers.items()}), (), {"pixel_values": x}
        )

    return logits


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_jvp_in_train_mode_matches_vjp_and_finite_difference(name: str) -> None:
    torch.manual_seed(0)
    model = build_cv_model(name, num_classes=5).double().train()
    stats_before = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)  # small: the AD mechanics are the point
    f = _functional(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    out, u = jvp(f, (params,), (direction,))
    assert torch.equal(out, f(params))

    # Adjoint identity <J v, w> = <v, J^T w>: forward and reverse mode must agree to rounding.
    _, pullback = vjp(f, params)
    w = torch.randn_like(out)
    (jt_w,) = pullback(w)
    lhs = (u * w).sum()
    rhs = sum((jt_w[k] * direction[k]).sum() for k in params)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)

    # Central difference with a step small against |v|, so that no ReLU or max-pool switches between sides.
    eps = 1e-6 / torch.sqrt(sum((d**2).sum() for d in direction.values())).item()
    fd = (
        f({k: params[k] + eps * direction[k] for k in params})
        - f({k: params[k] - eps * direction[k] for k in params})
    ) / (2 * eps)
    torch.testing.assert_close(u, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())

    for k, v in model.named_buffers():
        assert torch.equal(v, stats_before[k]), f"{k} moved"


def test_double_backward_in_train_mode_matches_forward_over_reverse() -> None:
    torch.manual_seed(0)
    model = build_cv_model("resnet8", num_classes=5).double().train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)  # small: the AD mechanics are the point
    y = torch.tensor([0, 1, 2, 3])
    f = _functional(model, x)
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    # Hessian-vector product through create_graph (what the unrolled MetaDistil reference does) ...
    loss = F.cross_entropy(f(params), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    gv = sum((g * direction[k]).sum() for g, k in zip(grads, params))
    hvp_reverse = torch.autograd.grad(gv, list(params.values()))

    # ... and through forward-mode AD over the gradient.
    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(f(p), y)

    detached = {k: v.detach() for k, v in params.items()}
    _, hvp_forward = jvp(grad(loss_fn), (detached,), (direction,))
    assert any(h.abs().max() > 0 for h in hvp_reverse)
    for h, k in zip(hvp_reverse, params):
        torch.testing.assert_close(h, hvp_forward[k], rtol=1e-8, atol=1e-10)
