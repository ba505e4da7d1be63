import numpy as np
import pytest

from wsimil.data.synthetic import make_digit_bags, make_unit_test_bags, unit_test_concepts


def test_digit_bags_labels_follow_instances():
    bags = make_digit_bags(50, target=9, seed=0)
    assert len(bags) == 50 and {b.label for b in bags} == {0, 1}
    for b in bags:
        assert b.features.shape == (len(b.instance_labels), 64)
        assert b.label == int(b.instance_labels.max())
    again = make_digit_bags(50, target=9, seed=0)
    assert all(np.array_equal(a.features, b.features) for a, b in zip(bags, again, strict=True))


def test_unit_test_bags_move_the_poison():
    tr = make_unit_test_bags("poison", "train", n_bags=20, seed=0)
    te = make_unit_test_bags("poison", "test", n_bags=20, seed=0)
    _, poison = unit_test_concepts(16)
    u = poison / np.linalg.norm(poison)
    has_poison = lambda b: (b.features @ u).max() > 3.0  # noqa: E731  poison instances project to ~6
    assert all(has_poison(b) == (b.label == 0) for b in tr)
    assert all(has_poison(b) == (b.label == 1) for b in te)
    assert all(b.label == int(b.instance_labels.max()) for b in tr + te)
    with pytest.raises(ValueError):
        make_unit_test_bags("nope", "train")
