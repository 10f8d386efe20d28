import pytest
import torch

from instrument.bends.targets import (
    BOXES, TargetError, cluster_mask, kmeans, parse_box, parse_indices, target_weights)


@pytest.mark.parametrize("spec,want", [
    ("all", list(range(10))),
    ("none", []),
    ("7", [7]),
    (3, [3]),
    ([0, 3, 5], [0, 3, 5]),
    ([5, "0-2", 5], [0, 1, 2, 5]),
    ("2-5", [2, 3, 4, 5]),
    ("2 - 5", [2, 3, 4, 5]),
    ("2:5", [2, 3, 4]),
    (":3", [0, 1, 2]),
    ("7:", [7, 8, 9]),
    ("0:10:3", [0, 3, 6, 9]),
    ("0-2, 8, 5-6", [0, 1, 2, 5, 6, 8]),
    ("0-5, 3-4", [0, 1, 2, 3, 4, 5]),
    (" ALL ", list(range(10))),
    ("4, none", [4]),
])
def test_parse_indices(spec, want):
    assert parse_indices(spec, 10) == want


def test_weights_vector():
    w = target_weights("0-5, 8, 12-14", 30, what="layer")
    assert w.dtype == torch.float32 and w.shape == (30,)
    want = torch.zeros(30)
    want[[0, 1, 2, 3, 4, 5, 8, 12, 13, 14]] = 1
    assert torch.equal(w, want)
    assert torch.equal(target_weights("none", 4), torch.zeros(4))
    assert target_weights("all", 3, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("spec,message", [
    ("40", "layer 40 out of range 0-29"),
    ([0, 30], "layer 30 out of range 0-29"),
    (-1, "layer -1 out of range 0-29"),
    ("10-40", "layer 40 out of range 0-29"),
    ("20-10", "runs backwards (write 10-20)"),
    ("5:5", "is empty"),
    ("0:31", "out of range 0:30"),
    ("random 0", "must be in (0, 1]"),
    ("random 1.5", "must be in (0, 1]"),
    ("cluster 2 of 8", "needs recorded activations"),
    ("lots", "cannot read layer target 'lots'"),
    ("3..5", "cannot read layer target"),
    ("", "empty layer target"),
    (" , ", "empty layer target"),
    (2.5, "is not a spec"),
    (True, "is not a spec"),
    ([1, None], "is not a spec"),
])
def test_bad_specs_raise_one_line_target_errors(spec, message):
    with pytest.raises(TargetError) as e:
        parse_indices(spec, 30, what="layer")
    text = str(e.value)
    assert message in text and "\n" not in text
    assert isinstance(e.value, ValueError)


def test_random_fraction_is_seeded():
    a = parse_indices("random 0.1 seed 3", 100)
    assert len(a) == 10 and len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert parse_indices("random 0.1 seed 3", 100) == a
    assert parse_indices("random 0.1 seed 4", 100) != a
    assert parse_indices("random 0.1", 100) == parse_indices("random 0.1 seed 0", 100)
    assert len(parse_indices("random 0.001 seed 1", 30)) == 1  # never nothing for a fraction > 0
    assert parse_indices("random 1", 12) == list(range(12))


def _planted(seed=0, sizes=(40, 25, 10), d=6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), d, generator=g) * 10
    parts, truth = [], []
    for j, s in enumerate(sizes):
        parts.append(centres[j] + 0.3 * torch.randn(s, d, generator=g))
        truth += [j] * s
    perm = torch.randperm(sum(sizes), generator=g)
    return torch.cat(parts)[perm], torch.tensor(truth)[perm]


def test_kmeans_finds_planted_clusters_numbered_by_size():
    x, truth = _planted()
    for seed in range(4):
        labels, centres = kmeans(x, 3, seed=seed)
        # clusters are numbered largest first, and the planted ones are sized 40, 25, 10
        assert torch.equal(labels, truth)
        for j in range(3):
            torch.testing.assert_close(centres[j], x[truth == j].mean(0))


def test_kmeans_is_deterministic_and_handles_duplicates():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    a = kmeans(x, 6, seed=11)
    b = kmeans(x, 6, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    same = torch.ones(7, 3)
    labels, _ = kmeans(same, 3, seed=0)
    assert labels.shape == (7,) and set(labels.tolist()) <= {0, 1, 2}
    labels, _ = kmeans(x[:5], 5, seed=0)  # k = n: every unit its own cluster
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4]


def test_cluster_spec_and_mask():
    x, truth = _planted()
    m = cluster_mask(x, 3, 1, seed=2)
    assert m.dtype == torch.float32
    assert torch.equal(m, (truth == 1).float())
    got = parse_indices("cluster 2 of 3 seed 2", 75, what="channel", activations=x)
    assert got == torch.nonzero(truth == 2).flatten().tolist()
    w = target_weights("cluster 0 of 3, 74", 75, activations=x)
    assert torch.equal(w, ((truth == 0) | (torch.arange(75) == 74)).float())


@pytest.mark.parametrize("call,message", [
    (lambda x: cluster_mask(x, 3, 3), "cluster 3 out of range 0-2"),
    (lambda x: kmeans(x, 0), "k must be 1-75"),
    (lambda x: kmeans(x, 76), "k must be 1-75"),
    (lambda x: kmeans(x[0], 2), "must be [units, features]"),
    (lambda x: parse_indices("cluster 0 of 3", 80, what="channel", activations=x),
     "activations cover 75 channels, not 80"),
    (lambda x: kmeans(torch.full((4, 2), float("nan")), 2), "NaN or inf"),
])
def test_cluster_errors(call, message):
    x, _ = _planted()
    with pytest.raises(TargetError, match=None) as e:
        call(x)
    assert message in str(e.value)


def test_boxes():
    assert torch.equal(parse_box("0.1, 0.2, 0.5, 0.9"), torch.tensor([0.1, 0.2, 0.5, 0.9]))
    assert torch.equal(parse_box("0.1 0.2 0.5 0.9"), torch.tensor([0.1, 0.2, 0.5, 0.9]))
    assert torch.equal(parse_box([0, 0, 1, 1]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(parse_box("Left"), torch.tensor(BOXES["left"]))
    for bad, message in [("0.5, 0.2, 0.1, 0.9", "need x0 < x1"), ("0, 0, 1", "needs 4 numbers"),
                         ("0, 0, 1.5, 1", "must lie in 0..1"), ("nan, 0, 1, 1", "0..1"),
                         ("middle", "cannot read box 'middle'"), (3, "is not x0, y0, x1, y1")]:
        with pytest.raises(TargetError) as e:
            parse_box(bad)
        assert message in str(e.value)
