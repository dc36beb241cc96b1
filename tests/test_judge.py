"""The shipped judge: loads offline, is accurate on fresh renders, names values right, rejects bad input."""

from __future__ import annotations

import pytest
import torch

from trasce.toy import world
from trasce.toy.judge import Judge, accuracy

# Training draws from seed 0 and judge.json reports seed 1234; this one is used by neither.
TEST_SEED = 20_251


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


def test_loads_shipped_weights_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = Judge.load()
    assert not loaded.net.training
    assert loaded.device == torch.device("cpu")
    assert list(loaded.attributes) == list(world.ATTRIBUTES)
    assert loaded.attributes == world.ATTRIBUTES
    assert sum(p.numel() for p in loaded.net.parameters()) < 300_000


def test_accuracy_on_fresh_images(judge: Judge) -> None:
    scores = accuracy(judge, n=500, seed=TEST_SEED)
    assert set(scores) == set(world.ATTRIBUTES)
    for name, score in scores.items():
        assert score >= 0.99, f"{name}: {score:.3f}"


def test_predict_returns_probabilities(judge: Judge) -> None:
    images = world.render(world.sample_scenes(5, torch.Generator().manual_seed(TEST_SEED)))
    probs = judge.predict(images)
    for name, values in world.ATTRIBUTES.items():
        assert probs[name].shape == (5, len(values))
        torch.testing.assert_close(probs[name].sum(dim=-1), torch.ones(5))


@pytest.mark.parametrize(
    "fixed",
    [
        {"shape": "star", "color": "blue", "fill": "solid", "background": "black"},
        {"shape": "circle", "color": "orange", "fill": "striped", "background": "white"},
        {"shape": "triangle", "color": "yellow", "fill": "outlined", "background": "gray"},
        {"shape": "cross", "color": "purple", "fill": "outlined", "background": "white"},
        {"shape": "square", "color": "green", "fill": "striped", "background": "black"},
    ],
)
def test_classify_names_hand_built_scenes(judge: Judge, fixed: dict[str, str]) -> None:
    indices = {name: world.ATTRIBUTES[name].index(value) for name, value in fixed.items()}
    scene = world.sample_scenes(4, torch.Generator().manual_seed(TEST_SEED), fixed=indices)
    assert judge.classify(world.render(scene)) == [fixed] * 4


def test_other_sizes_and_pil(judge: Judge) -> None:
    scene = world.sample_scenes(8, torch.Generator().manual_seed(TEST_SEED + 1))
    expected = judge.classify(world.render(scene))
    assert judge.classify(world.render(scene, size=64)) == expected
    assert judge.classify_pil(world.to_pil(world.render(scene))) == expected


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 4, 32, 32), (3, 32, 32)])
def test_rejects_wrong_shapes(judge: Judge, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)") as error:
        judge.predict(torch.zeros(shape))
    assert str(tuple(shape)) in str(error.value)
