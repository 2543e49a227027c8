"""Local training learns; evaluation metrics are right."""

from __future__ import annotations

import numpy as np
import pytest

from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor, make_loader
from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import PromptedModel, PromptSettings
from fedprime_core.method.training import TrainSettings, evaluate, train_local
from fedprime_core.metrics import classification_metrics, f1_scores
from tests.generated_data import CLASSES, one_modality_samples


@pytest.mark.parametrize("modality", ["image", "text"])
def test_training_beats_chance_through_one_modality(tiny_vilt, modality):
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor

    backbone, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 24)

    def dataset(count: int, seed: int) -> MultimodalDataset:
        return MultimodalDataset(
            one_modality_samples(modality, count, seed), np.zeros(count, int), processor, CLASSES, cache_images=True
        )

    train, test = dataset(384, 0), dataset(160, 1)
    model = PromptedModel(backbone, method_spec("fedprime"), CLASSES, PromptSettings(tau=8, kappa=2), seed=0)
    before = evaluate(model, make_loader(test, 80, shuffle=False))["accuracy"]
    settings = TrainSettings(epochs=4, lr=0.05, momentum=0.9)
    result = train_local(model, make_loader(train, 32, shuffle=True, seed=0), settings)
    after = evaluate(model, make_loader(test, 80, shuffle=False))
    print(f"\n{modality}-only label: accuracy {before:.3f} -> {after['accuracy']:.3f} (chance {1 / CLASSES:.2f})")
    assert after["accuracy"] >= 0.55, after
    assert result.num_examples == 384 and result.steps == 4 * 12
    assert set(result.usage) == {"intra", "inter"}
    assert all(u.sum() == 4 * 384 * 2 for u in result.usage.values())  # kappa prompts per sample per epoch


def test_fedprox_term_keeps_weights_near_the_start(tiny_vilt):
    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import load_image_processor

    backbone, tokenizer = tiny_vilt
    processor = MultimodalProcessor(tokenizer, load_image_processor(resolve_source("vilt", "tiny-vilt")), 24)
    data = MultimodalDataset(
        one_modality_samples("image", 96, 2), np.zeros(96, int), processor, CLASSES, cache_images=True
    )

    def drift(mu: float) -> float:
        model = PromptedModel(backbone, method_spec("fedprox-p"), CLASSES, PromptSettings(tau=6, kappa=2), seed=0)
        start = {k: p.detach().clone() for k, p in model.trainable_parameters().items()}
        train_local(
            model,
            make_loader(data, 32, shuffle=True, seed=0),
            TrainSettings(epochs=2, lr=0.05, proximal_mu=mu, max_grad_norm=0),
        )
        return sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in model.trainable_parameters().items())

    assert drift(5.0) < drift(0.0)


def test_metrics_single_and_multi_label():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    out = classification_metrics(logits, np.array([0, 1, 2, 2]), multilabel=False)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["micro_f1"] == pytest.approx(0.75)
    assert out["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)
    truth = np.array([[1, 1, 0], [0, 1, 0]])
    pred_logits = np.array([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]])
    out = classification_metrics(pred_logits, truth, multilabel=True)
    assert out["accuracy"] == 0.0
    macro, micro = f1_scores(truth > 0, pred_logits > 0)
    assert micro == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert out["macro_f1"] == pytest.approx(macro)
