"""Detection metrics: positive class = contaminated; undefined metrics are None, not zero."""

import pytest

from clair_lightning.metrics import detection_metrics


def test_metrics_on_a_known_round():
    truth = [True, True, False, False, False]
    flags = [True, False, True, False, False]
    scores = [9.0, 1.0, 5.0, 0.5, 0.1]
    metrics = detection_metrics(flags, scores, truth)
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["recall"] == pytest.approx(0.5)
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["fpr"] == pytest.approx(1 / 3)
    # contaminated scores 9 and 1 vs benign 5, 0.5, 0.1: 5 of 6 pairs ordered correctly
    assert metrics["auroc"] == pytest.approx(5 / 6)
    assert metrics["true_positives"] == 1 and metrics["false_positives"] == 1


def test_round_without_contamination_reports_fpr_alone():
    metrics = detection_metrics([False, True, False], [0.1, 4.0, 0.2], [False, False, False])
    assert metrics["fpr"] == pytest.approx(1 / 3)
    for name in ("precision", "recall", "f1", "auroc", "average_precision"):
        assert metrics[name] is None


def test_large_and_infinite_scores_keep_their_order():
    """Scores are mapped into [0, 1] monotonically; a sigmoid would tie 50 and 80."""
    metrics = detection_metrics(
        [True, True, False, False], [80.0, float("inf"), 50.0, 49.0], [True, True, False, False]
    )
    assert metrics["auroc"] == pytest.approx(1.0)
    assert metrics["average_precision"] == pytest.approx(1.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one entry per client"):
        detection_metrics([True], [1.0, 2.0], [True, False])
