"""Missing-modality simulation, per-client mixtures, partitions, the embedded dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprime_core.data.embedded import CLASSES, make_embedded_dataset
from fedprime_core.data.missing import (
    Pattern,
    client_mixtures,
    evaluation_mixture,
    load_missing_table,
    pattern_counts,
    sample_patterns,
    setting_mixture,
)
from fedprime_core.data.partition import client_size_weights, dirichlet_partition, iid_partition, partition
from fedprime_core.data.records import DataError


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("miss-text", (0.3, 0.7, 0.0)),
        ("miss-image", (0.3, 0.0, 0.7)),
        ("miss-both", (0.3, 0.35, 0.35)),
        ("none", (1, 0, 0)),
    ],
)
def test_training_settings_realise_their_rates_exactly(setting, expected):
    patterns = sample_patterns(1000, setting_mixture(setting, 0.7), np.random.default_rng(0))
    counts = pattern_counts(patterns)
    assert [counts["complete"], counts["text-missing"], counts["image-missing"]] == [round(1000 * e) for e in expected]


def test_test_settings():
    assert evaluation_mixture("text-only", "miss-text", 0.7)[Pattern.IMAGE_MISSING] == 1.0
    assert evaluation_mixture("image-only", "miss-text", 0.7)[Pattern.TEXT_MISSING] == 1.0
    assert evaluation_mixture("full-modal", "miss-both", 0.7)[Pattern.COMPLETE] == 1.0
    np.testing.assert_allclose(evaluation_mixture("same-as-train", "miss-image", 0.5), [0.5, 0, 0.5])
    np.testing.assert_allclose(evaluation_mixture("miss-both", "miss-text", 0.7), [0.3, 0.35, 0.35])


def test_patterns_are_deterministic_for_a_seed():
    mix = setting_mixture("miss-both", 0.7)
    a = sample_patterns(50, mix, np.random.default_rng(3))
    b = sample_patterns(50, mix, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_per_client_mixtures_differ_and_average_to_the_global_rate():
    mixtures = client_mixtures(4000, "miss-both", 0.7, alpha=1.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(mixtures.mean(axis=0), [0.3, 0.35, 0.35], atol=0.02)
    assert mixtures[:, 1].std() > 0.2  # clients really differ (inter-heterogeneity)
    np.testing.assert_allclose(mixtures.sum(axis=1), 1.0)
    tight = client_mixtures(4000, "miss-both", 0.7, alpha=100.0, rng=np.random.default_rng(0))
    assert tight[:, 1].std() < 0.06
    text = client_mixtures(50, "miss-text", 0.7, alpha=1.0, rng=np.random.default_rng(0))
    assert np.all(text[:, Pattern.IMAGE_MISSING] == 0)  # never a pattern the setting excludes
    same = client_mixtures(5, "miss-both", 0.7, alpha=0.0, rng=np.random.default_rng(0))
    assert np.allclose(same, [0.3, 0.35, 0.35])


def test_realised_client_patterns_follow_their_mixture():
    rng = np.random.default_rng(1)
    for mixture in client_mixtures(20, "miss-both", 0.7, alpha=0.5, rng=rng):
        patterns = sample_patterns(200, mixture, rng)
        freq = np.bincount(patterns, minlength=3) / 200
        assert np.abs(freq - mixture).max() <= 1 / 200 + 1e-9


def test_explicit_missing_table(tmp_path):
    path = tmp_path / "table.yaml"
    path.write_text("default: [0.5, 0.25, 0.25]\n0: {complete: 0.1, text-missing: 0.9}\n2: [0.0, 0.0, 1.0]\n")
    table = load_missing_table(path, 3)
    np.testing.assert_allclose(table, [[0.1, 0.9, 0.0], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    path.write_text("0: [0.5, 0.6, 0.0]\n")
    with pytest.raises(DataError, match="sum to 1"):
        load_missing_table(path, 1)
    path.write_text("0: [1, 0, 0]\n")
    with pytest.raises(DataError, match="no entry for client 1"):
        load_missing_table(path, 2)
    path.write_text("0: {complete: 1.0}\n7: [1, 0, 0]\n")
    with pytest.raises(DataError, match="outside"):
        load_missing_table(path, 1)
    with pytest.raises(DataError, match="does not exist"):
        load_missing_table(tmp_path / "nope.yaml", 1)


def check_partition(parts, n, min_size):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint and complete
    assert min(len(p) for p in parts) >= min_size


def test_iid_partition_is_disjoint_complete_and_balanced():
    labels = np.repeat(np.arange(8), 50)
    parts = iid_partition(labels, 5, min_size=10, seed=0)
    check_partition(parts, 400, 10)
    for p in parts:
        assert np.bincount(labels[p], minlength=8).min() >= 9  # every client sees every label evenly


def test_dirichlet_partition_skews_labels_and_respects_min_size():
    labels = np.repeat(np.arange(8), 100)
    parts = dirichlet_partition(labels, 10, alpha=0.1, min_size=20, seed=0)
    check_partition(parts, 800, 20)
    dominant = [np.bincount(labels[p], minlength=8).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.5  # skew is visible: most of a client's data is one label
    iid = iid_partition(labels, 10, min_size=20, seed=0)
    assert np.mean([np.bincount(labels[p], minlength=8).max() / len(p) for p in iid]) < 0.2


def test_partitions_are_pure_functions_of_their_inputs():
    labels = np.random.default_rng(0).integers(0, 5, size=300)
    a = partition(labels, 6, 0.3, 10, seed=4)
    b = partition(labels, 6, 0.3, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="cannot give"):
        partition(labels, 40, 0.0, 10, seed=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_client_size_sigma_makes_sizes_imbalanced_and_keeps_the_label_split(alpha):
    labels = np.repeat(np.arange(8), 150)
    balanced = partition(labels, 8, alpha, 10, seed=3)
    skewed = partition(labels, 8, alpha, 10, seed=3, size_sigma=1.0)
    check_partition(skewed, 1200, 10)
    weights = client_size_weights(8, 1.0, seed=3)
    sizes = np.array([len(p) for p in skewed])
    assert np.corrcoef(sizes, weights)[0, 1] > 0.8  # sizes follow the drawn weights
    if alpha == 0:  # IID labels: equal sizes without sigma; with it, only the size differs, not the label mix
        assert {len(p) for p in balanced} == {150} and sizes.max() > 3 * sizes.min()
        assert np.all(np.abs(sizes - weights * 1200) <= 8 + 10)
        for p in skewed:
            mix = np.bincount(labels[p], minlength=8) / len(p)
            assert np.abs(mix - 1 / 8).max() < 0.05 + 8 / len(p)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, partition(labels, 8, alpha, 10, seed=3, size_sigma=1.0)))
    with pytest.raises(ValueError, match="non-negative"):
        partition(labels, 8, alpha, 10, seed=3, size_sigma=-1.0)


def test_client_size_sigma_is_a_validated_run_config_key():
    from fedprime_core.config import ConfigError, parse_run_config

    assert parse_run_config({"client-size-sigma": 1.5}).client_size_sigma == 1.5
    with pytest.raises(ConfigError, match="client-size-sigma"):
        parse_run_config({"client-size-sigma": -0.5})


def test_embedded_dataset_shape_and_determinism():
    data = make_embedded_dataset(seed=0, num_train=80, num_dev=16, num_test=16)
    again = make_embedded_dataset(seed=0, num_train=80, num_dev=16, num_test=16)
    assert data.classes == CLASSES and not data.multilabel and data.num_classes == 8
    assert len(data.train) == 80 and np.bincount([s.label for s in data.train]).tolist() == [10] * 8
    first = data.train[0]
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8 and first.text
    assert first.text == again.train[0].text and np.array_equal(first.image, again.train[0].image)
    other = make_embedded_dataset(seed=1, num_train=80, num_dev=0, num_test=0)
    assert other.train[0].text != first.text


def test_embedded_classes_are_recoverable_from_each_modality_and_better_from_both():
    """One linear probe on raw features: text alone, image alone, both combined."""
    data = make_embedded_dataset(seed=0, num_train=1600, num_dev=0, num_test=800)
    from fedprime_core.data.embedded import vocabulary

    vocab = {w: i for i, w in enumerate(vocabulary())}

    def features(samples):
        text = np.zeros((len(samples), len(vocab)))
        for i, s in enumerate(samples):
            for w in s.text.split():
                text[i, vocab[w]] += 1
        image = (
            np.stack([s.image.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3)).reshape(16, 3) for s in samples]) / 127.5 - 1
        )
        # bag of cell colours: sorted per channel, so the layout does not matter
        image = np.sort(image, axis=1).reshape(len(samples), -1)
        return text, image, np.array([s.label for s in samples])

    def probe_accuracy(train_x, test_x):
        """Ridge regression onto one-hot labels, the same linear probe for every feature set."""
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        a, b = (train_x - mean) / std, (test_x - mean) / std
        a, b = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
        weights = np.linalg.solve(a.T @ a + 1.0 * np.eye(a.shape[1]), a.T @ np.eye(8)[ty])
        return float(np.mean((b @ weights).argmax(1) == sy))

    tt, ti, ty = features(data.train)
    st, si, sy = features(data.test)
    text_acc, image_acc = probe_accuracy(tt, st), probe_accuracy(ti, si)
    both_acc = probe_accuracy(np.c_[tt, ti], np.c_[st, si])
    assert text_acc > 0.6 and image_acc > 0.35, (text_acc, image_acc)  # chance is 0.125
    assert both_acc > max(text_acc, image_acc) + 0.05, (text_acc, image_acc, both_acc)


def _text_item(mask: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([100 + i if m else 0 for i, m in enumerate(mask)])
    return {
        "input_ids": ids,
        "attention_mask": torch.tensor(mask),
        "token_type_ids": torch.zeros(len(mask), dtype=torch.long),
        "labels": torch.tensor(0),
        "missing_type": torch.tensor(0),
        "image": torch.zeros(1, 4),
    }


def test_batch_padding_keeps_every_real_token_and_drops_only_common_padding():
    from fedprime_core.data.processing import collate

    right = [_text_item([1, 1, 1, 0, 0, 0]), _text_item([1, 1, 0, 0, 0, 0])]
    full, trimmed = collate(right), collate(right, trim_text=True)
    assert full["input_ids"].shape == (2, 6) and trimmed["input_ids"].shape == (2, 3)
    assert torch.equal(trimmed["input_ids"], full["input_ids"][:, :3])
    assert torch.equal(trimmed["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert trimmed["token_type_ids"].shape == (2, 3) and trimmed["image_features"].shape == (2, 1, 4)
    # Left padding (some tokenizers): the kept positions are the tail, real tokens in their order.
    left = collate([_text_item([0, 0, 0, 1, 1, 1]), _text_item([0, 0, 0, 0, 1, 1])], trim_text=True)
    assert torch.equal(left["input_ids"], torch.tensor([[103, 104, 105], [0, 104, 105]]))
    # A batch that fills text-max-length is left as it is.
    filled = collate([_text_item([1, 1, 1]), _text_item([1, 0, 0])], trim_text=True)
    assert filled["input_ids"].shape == (2, 3)


def test_text_padding_is_validated():
    from fedprime_core.config import ConfigError, parse_run_config

    assert parse_run_config({"text-padding": "batch"}).text_padding == "batch"
    assert parse_run_config({}).text_padding == "fixed"
    with pytest.raises(ConfigError, match="text-padding"):
        parse_run_config({"text-padding": "longest"})
