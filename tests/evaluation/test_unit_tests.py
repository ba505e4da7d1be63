"""The MIL algorithmic unit tests must tell apart a model that respects the standard MIL assumption (instance
max pooling) from one that can learn from negative-only evidence (mean pooling)."""

from wsimil.evaluation.unit_tests import run_unit_test


def test_max_pooling_passes_presence_and_poison():
    assert run_unit_test("max", "presence", epochs=15, n_bags=120)["passed"]
    assert run_unit_test("max", "poison", epochs=15, n_bags=120)["passed"]


def test_mean_pooling_fails_poison():
    res = run_unit_test("mean", "poison", epochs=15, n_bags=120)
    assert not res["passed"] and res["auc"] < 0.5  # it learned "poison => negative"


def test_abmil_passes_presence():
    assert run_unit_test("abmil", "presence", epochs=15, n_bags=120)["passed"]
