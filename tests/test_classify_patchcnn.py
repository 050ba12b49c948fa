"""The direct patch-CNN baseline on tiny synthetic images (a slow test checks it learns)."""

import numpy as np
import pytest

from fpstore.classify.bags import Bags
from fpstore.classify.methods import create_classifier
from fpstore.classify.patchcnn import PatchCNN, PatchCNNConfig
from fpstore.classify.protocol import cross_validate
from fpstore.classify.settings import CVProtocol
from fpstore.errors import ClassifyError


def _image_bags(n_patients, n_patches, px=32, seed=0):
    """Positive patients' patches are pinker (more red, less blue) than negatives'."""
    rng = np.random.default_rng(seed)
    y = np.array([i % 2 for i in range(n_patients)], dtype=np.int8)
    index = np.repeat(np.arange(n_patients), n_patches)
    ids = np.array([f"S{p}/{k}_0_224" for k, p in enumerate(index)])
    images = {}
    for pid, p in zip(ids, index):
        base = rng.integers(60, 200, size=(px, px, 3)).astype(np.int16)
        base[..., 0] += 40 if y[p] else -40
        base[..., 2] -= 40 if y[p] else -40
        images[pid] = np.clip(base, 0, 255).astype(np.uint8)
    bags = Bags(
        [f"P{i}" for i in range(n_patients)],
        np.zeros((len(index), 0)),
        index,
        patch_ids=ids,
        slide_ids=[f"S{p}" for p in index],
    )
    return bags, y, lambda keys: np.stack([images[k] for k in keys])


def test_patient_score_is_the_mean_patch_probability():
    bags, y, images = _image_bags(8, 3)
    model = PatchCNN(PatchCNNConfig(max_epochs=1, batch_size=8, device="cpu"), images=images)
    model.fit(bags, y, eval_set=(bags, y))
    patch = model.patch_scores(bags)
    assert patch.min() >= 0 and patch.max() <= 1
    patient = model.decision_function(bags)
    np.testing.assert_allclose(patient, np.bincount(bags.bag_index, weights=patch) / 3, atol=1e-6)
    assert model.best_epoch_ == 1


def test_patch_cnn_refuses_a_bad_image_source_and_missing_weights():
    bags, y, _ = _image_bags(4, 2)
    bad = PatchCNN(
        PatchCNNConfig(max_epochs=1, device="cpu"), images=lambda k: np.zeros((len(k), 8, 8))
    )
    with pytest.raises(ClassifyError, match="uint8"):
        bad.fit(bags, y)
    with pytest.raises(ClassifyError, match="not found"):
        PatchCNNConfig(weights="/no/such/resnet.pth")


@pytest.mark.slow
def test_patch_cnn_learns_a_colour_signal_under_the_cv_protocol():
    bags, y, images = _image_bags(40, 4, seed=1)
    estimator = create_classifier(
        "patch-cnn", images=images, max_epochs=4, patience=2, batch_size=16, device="cpu"
    )
    result = cross_validate(bags, y, estimator, CVProtocol(n_boot=300), progress=False)
    assert result.metrics["auc"] > 0.8
    assert len(result.predictions.patch_scores) == len(bags.bag_index)


def test_a_saved_patch_cnn_state_scores_as_the_fitted_one():
    bags, y, images = _image_bags(6, 2)
    model = create_classifier(
        "patch-cnn", images=images, max_epochs=1, batch_size=8, device="cpu"
    ).fit(bags, y)
    state = model.get_state()
    again = create_classifier("patch-cnn", images=images, device="cpu").set_state(state)
    np.testing.assert_array_equal(again.patch_scores(bags), model.patch_scores(bags))


def test_pixels_come_at_one_size_whatever_the_encoders_resize_to(tmp_path):
    from fpstore.classify.data import PIXELS_PX, cache_images, load_bags
    from fpstore.encoders.base import Encoder, Preprocessing
    from fpstore.encoders.registry import list_encoders, register_encoder
    from fpstore.extract.run import extract
    from tests._extraction import config, make_store

    if "tiny112" not in list_encoders():

        @register_encoder("tiny112")
        def tiny112():  # resizes its patches to 112 px, where "tiny" takes 224
            from torch import nn

            net = nn.Sequential(nn.Conv2d(3, 8, 16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            return Encoder("tiny112", net, 8, Preprocessing(out_px=112), "0" * 16, "test")

    store, _ = make_store(tmp_path, slides=["S0", "S1"])
    for encoder in ("tiny", "tiny112"):
        assert not extract(store, "c", config(encoder=encoder, patches=3), progress=False).failed
    bags, _ = load_bags(store, "c", None)
    images = cache_images(store, "c", bags, progress=False)(list(bags.patch_ids))
    assert images.shape == (len(bags.patch_ids), PIXELS_PX, PIXELS_PX, 3)


def test_batches_are_turned_as_uint8_and_normalised_as_imagenet_float():
    """Turning uint8 pixels before the float conversion (a quarter of the bytes to move)
    and normalising in one multiply-add gives the float path's batch, draw for draw."""
    import torch

    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    model = PatchCNN(PatchCNNConfig(device="cpu"), images=lambda ids: pixels[ids])
    for seed in range(8):  # every turn, with and without the flip
        batch = model._batch(np.arange(6), np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        x = torch.rot90(x, int(draws.integers(4)), dims=(2, 3))
        x = x.flip(3) if draws.random() < 0.5 else x
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch.testing.assert_close(batch, (x - mean) / std, rtol=0, atol=2e-6)
    plain = model._batch(np.arange(6), None)
    assert plain.dtype == torch.float32 and plain.shape == (6, 3, 16, 16)
