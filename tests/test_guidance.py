"""The guidance maths against hand-computed numbers."""

import math

import pytest
import torch

from trasce import guidance


def test_cfg_and_negative_prompt_by_hand():
    e0, ep, ec = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]]), torch.tensor([[0.5, 0.5]])
    # 1 + 7.5 * (3 - 1) = 16 ; 2 + 7.5 * (1 - 2) = -5.5
    assert guidance.cfg(e0, ep, 7.5).tolist() == [[16.0, -5.5]]
    # 0.5 + 2 * (3 - 0.5) = 5.5 ; 0.5 + 2 * (1 - 0.5) = 1.5
    assert guidance.negative_prompt(ec, ep, 2.0).tolist() == [[5.5, 1.5]]
    # 1 + 2 * (3 - 0.5) = 6 ; 2 + 2 * (1 - 0.5) = 3
    assert guidance.modified_negation(e0, ep, ec, 2.0).tolist() == [[6.0, 3.0]]


def test_corner_case_prompt_equals_concept():
    """The paper's corner case: conventional negation returns the prompt, TraSCE's the unconditional."""
    e0, ep = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(guidance.negative_prompt(ep, ep, 7.5), ep)
    assert torch.equal(guidance.modified_negation(e0, ep, ep, 7.5), e0)


def test_per_image_scale():
    e0 = torch.zeros(2, 1, 2)
    ep = torch.ones(2, 1, 2)
    out = guidance.cfg(e0, ep, torch.tensor([2.0, 5.0]))
    assert out.tolist() == [[[2.0, 2.0]], [[5.0, 5.0]]]


def test_guidance_off_at_or_below_one_per_image_and_shared():
    guided, pred_p = torch.full((3, 2), 5.0), torch.full((3, 2), -1.0)
    per_image = guidance.guidance_off_at_or_below_one(guided, pred_p, torch.tensor([0.5, 1.0, 1.01]))
    assert per_image[:, 0].tolist() == [-1.0, -1.0, 5.0]
    assert torch.equal(guidance.guidance_off_at_or_below_one(guided, pred_p, 1.0), pred_p)
    assert torch.equal(guidance.guidance_off_at_or_below_one(guided, pred_p, 7.5), guided)


def test_distance_is_per_image():
    ep = torch.zeros(3, 1, 2, 2)
    ec = torch.zeros(3, 1, 2, 2)
    ec[0, 0, 0, 0] = 3.0
    ec[0, 0, 1, 1] = 4.0  # image 0: sqrt(9 + 16) = 5
    ec[1] = 1.0  # image 1: sqrt(4 * 1) = 2
    d = guidance.distance(ep.half(), ec.half())
    assert d.dtype == torch.float32
    assert d.tolist() == [5.0, 2.0, 0.0]


def test_kernels_by_hand():
    d = torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(guidance.kernel(d, 2.0), torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0)]))
    assert torch.allclose(guidance.kernel(d, 2.0, "gaussian"),
                          torch.tensor([1.0, math.exp(-1 / 8), math.exp(-4 / 8)]))
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got 0"):
        guidance.kernel(d, 0.0)
    with pytest.raises(ValueError, match="unknown kernel 'box'"):
        guidance.kernel(d, 1.0, "box")


def test_steering_step_decreases_distance_by_hand():
    """One step on a linear 'model' with a closed form: pred_p - pred_c = x - c.

    d = ||x - c||, L = -lam * exp(-d / sigma), dL/dx = lam / sigma * exp(-d / sigma) * (x - c) / d.
    """
    lam, eta, sigma = 1.5, 1.0, 2.0
    c = torch.tensor([[0.0, 0.0]])
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)  # d = 5
    loss = guidance.steering_loss(guidance.distance(x, c), lam, sigma)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    factor = lam / sigma * math.exp(-5 / sigma) / 5
    assert torch.allclose(grad, torch.tensor([[3.0 * factor, 4.0 * factor]]))
    moved = guidance.steer(x.detach(), grad, eta)
    assert torch.allclose(moved, torch.tensor([[3.0 - eta * 3 * factor, 4.0 - eta * 4 * factor]]))
    assert guidance.distance(moved, c).item() < 5.0  # descent moves towards the concept
    # the chain rule: dL/dd * dd/dx with dd/dx = (x - c) / d, and update_bound with ||dd/dx|| = 1
    slope = guidance.loss_slope(torch.tensor([5.0]), lam, sigma)
    assert torch.allclose(slope * x.detach() / 5.0, grad)
    bound = guidance.update_bound(torch.tensor([5.0]), lam, eta, sigma, torch.tensor([1.0]))
    assert torch.allclose(bound, (eta * grad).norm().reshape(1))
    # a negative lambda or eta reverses the update, not its size
    for signs in ((-1, 1), (1, -1), (-1, -1)):
        flipped = guidance.update_bound(torch.tensor([5.0]), signs[0] * lam, signs[1] * eta, sigma, torch.tensor([1.0]))
        assert torch.allclose(flipped, bound)


def test_batched_gradient_gives_each_image_its_own():
    c = torch.zeros(2, 2)
    x = torch.tensor([[3.0, 4.0], [0.6, 0.8]], requires_grad=True)  # d = 5 and 1
    loss = guidance.steering_loss(guidance.distance(x, c), 1.0, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    for i, d in enumerate([5.0, 1.0]):
        expected = math.exp(-d) * x[i].detach() / d
        assert torch.allclose(grad[i], expected)


def test_published_presets_are_the_papers_table():
    """TRASCE.md's table of published settings (SD v1.4, DDIM 50 steps), transcribed here independently."""
    from trasce.presets import resolve

    nudity = "naked, nude, bare, exposed, Stripped, topless, male genitalia, penis, buttocks"
    violence = "hate, harassment, violence, suffering, humiliation, harm, suicide, blood"
    assert resolve("nudity", None, None, None, None) == (nudity, 1.5, 1.0, 2.0)
    assert resolve("violence", None, None, None, None) == (violence, 1.5, 1.0, 1.0)
    assert resolve("style", "Van Gogh", None, None, None) == ("Van Gogh", 1.0, 1.0, 0.25)
    assert resolve("object", "French Horn", None, None, None) == ("French Horn", 1.0, 1.0, 1.0)
    assert resolve("nudity", None, None, 5.0, None) == (nudity, 1.5, 5.0, 2.0)  # an explicit value wins


@pytest.mark.parametrize(("preset", "example"), [("toy-shape", "circle"), ("object", "French Horn"),
                                                  ("style", "Van Gogh"), (None, "Van Gogh")])
def test_a_missing_concept_is_asked_for_with_an_example_of_its_kind(preset, example):
    from trasce import presets

    with pytest.raises(ValueError) as info:
        presets.resolve(preset, None, None, None, None)
    assert str(info.value).endswith(f"(e.g. concept={example!r}; on the command line, --concept {example!r})")


def test_gaussian_kernel_slope_and_bound_by_hand():
    """L = -lam * exp(-d^2 / (2 sigma^2)); dL/dd = lam * d / sigma^2 * exp(-d^2 / (2 sigma^2))."""
    lam, eta, sigma = 2.0, 0.5, 3.0
    c = torch.zeros(1, 2)
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)  # d = 5
    loss = guidance.steering_loss(guidance.distance(x, c), lam, sigma, "gaussian")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    slope = lam * 5.0 / sigma**2 * math.exp(-25.0 / (2 * sigma**2))
    assert torch.allclose(grad, slope * x.detach() / 5.0)
    assert torch.allclose(guidance.loss_slope(torch.tensor([5.0]), lam, sigma, "gaussian"), torch.tensor([slope]))
    bound = guidance.update_bound(torch.tensor([5.0]), lam, eta, sigma, torch.tensor([1.0]), "gaussian")
    assert torch.allclose(bound, (eta * grad).norm().reshape(1))
