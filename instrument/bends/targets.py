"""Target specs: which layers, steps, heads, tokens, channels or neurons a bend reaches.

A spec is text a performer writes in a patch (or a list of such terms), read once when the patch
loads, never on the hot path. Terms are joined by commas and their selections united:

    all | none                 everything / nothing
    7                          one index
    10-20                      an inclusive range (10 to 20, both included)
    10:20  or  10:20:2         a Python slice (10 to 19; every 2nd)
    random 0.1 seed 3          a seeded random fraction of the n units (seed defaults to 0)
    cluster 2 of 8 seed 0      k-means cluster 2 of 8 over recorded activations, clusters
                               numbered by size (0 = the largest)

e.g. "0-5, 8, 12-14". Integers and lists of integers or terms are accepted as well. Each parser
checks against n and raises `TargetError` with a one-line message and a hint.

Regions are boxes "x0, y0, x1, y1" in 0..1 of the picture (x right, y down), or one of the names
in `BOXES`.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

Tensor = torch.Tensor


class TargetError(ValueError):
    """A target spec the instrument cannot use; the message is one line, fit for the stage."""


_FORMS = "all, none, 7, 0-5, 10:20, random 0.1 seed 3, cluster 2 of 8"

_RANDOM = re.compile(r"random\s+([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(?:\s+seed\s+(\d+))?$")
_CLUSTER = re.compile(r"cluster\s+(\d+)\s+of\s+(\d+)(?:\s+seed\s+(\d+))?$")
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)$")
_SLICE = re.compile(r"(\d*)\s*:\s*(\d*)(?:\s*:\s*(\d+))?$")


def _check(i: int, n: int, what: str) -> int:
    if not 0 <= i < n:
        raise TargetError(f"{what} {i} out of range 0-{n - 1} ({n} {what}s, counted from 0)")
    return i


def _term(term: str, n: int, what: str, activations: Tensor | None) -> list[int]:
    t = " ".join(term.strip().lower().split())
    if t == "all":
        return list(range(n))
    if t == "none":
        return []
    if t.lstrip("-").isdigit():
        return [_check(int(t), n, what)]
    m = _RANGE.match(t)
    if m:
        a, b = int(m[1]), int(m[2])
        if a > b:
            raise TargetError(f"{what} range {a}-{b} runs backwards (write {b}-{a})")
        _check(a, n, what)
        _check(b, n, what)
        return list(range(a, b + 1))
    m = _SLICE.match(t)
    if m:
        a = int(m[1]) if m[1] else 0
        b = int(m[2]) if m[2] else n
        step = int(m[3]) if m[3] else 1
        if step < 1:
            raise TargetError(f"{what} slice {term.strip()!r} needs a step of 1 or more")
        if a > n or b > n:
            raise TargetError(f"{what} slice {a}:{b} out of range 0:{n} (the end is excluded)")
        if a >= b:
            raise TargetError(f"{what} slice {a}:{b} is empty "
                              f"(the end is excluded: try {a}:{a + 1})")
        return list(range(a, b, step))
    m = _RANDOM.match(t)
    if m:
        frac = float(m[1])
        seed = int(m[2]) if m[2] else 0
        if not 0 < frac <= 1:
            raise TargetError(f"random fraction {m[1]} must be in (0, 1], e.g. random 0.1 seed 3")
        count = max(1, round(frac * n))
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=g)[:count].tolist())
    m = _CLUSTER.match(t)
    if m:
        which, k = int(m[1]), int(m[2])
        seed = int(m[3]) if m[3] else 0
        if activations is None:
            raise TargetError(f"'{term.strip()}' needs recorded activations of the {what}s "
                              f"(record them first, then load the patch)")
        mask = cluster_mask(activations, k, which, seed=seed, n=n, what=what)
        return torch.nonzero(mask).flatten().tolist()
    raise TargetError(f"cannot read {what} target {term.strip()!r}: use {_FORMS}")


def parse_indices(spec, n: int, *, what: str = "index", activations: Tensor | None = None
                  ) -> list[int]:
    """Sorted distinct indices in 0..n-1 selected by `spec` (see the module doc)."""
    if n < 1:
        raise TargetError(f"no {what}s to target")
    if isinstance(spec, bool):
        raise TargetError(f"{what} target {spec!r} is not a spec: use {_FORMS}")
    if isinstance(spec, int):
        return [_check(spec, n, what)]
    if isinstance(spec, str):
        terms: Iterable = spec.split(",") if "," in spec else [spec]
    elif isinstance(spec, (list, tuple)):
        terms = spec
    else:
        raise TargetError(f"{what} target {spec!r} is not a spec: use {_FORMS}")
    chosen: set[int] = set()
    empty = True
    for term in terms:
        if isinstance(term, bool) or not isinstance(term, (int, str)):
            raise TargetError(f"{what} target {term!r} is not a spec: use {_FORMS}")
        if isinstance(term, int):
            chosen.add(_check(term, n, what))
        elif term.strip():
            chosen.update(_term(term, n, what, activations))
        else:
            continue
        empty = False
    if empty:
        raise TargetError(f"empty {what} target (write 'none' to target nothing)")
    return sorted(chosen)


def target_weights(spec, n: int, *, what: str = "index", activations: Tensor | None = None,
                   device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A weight vector [n]: 1 for targeted units, 0 elsewhere."""
    w = torch.zeros(n, dtype=dtype)
    idx = parse_indices(spec, n, what=what, activations=activations)
    if idx:
        w[torch.tensor(idx)] = 1
    return w.to(device) if device is not None else w


# -- k-means -------------------------------------------------------------------------------------
def kmeans(x: Tensor, k: int, *, seed: int = 0, iters: int = 50, restarts: int = 4
           ) -> tuple[Tensor, Tensor]:
    """Cluster the rows of x [n, d]; returns (labels [n] int64, centres [k, d]).

    k-means++ seeding from a CPU generator seeded with `seed`, then Lloyd iterations until the
    labels settle (at most `iters`); the best of `restarts` runs (least squared error) wins, since
    a single k-means++ start can settle in a split-one-merge-two minimum. Deterministic for a
    seed. An emptied cluster restarts at the point farthest from its centre. Clusters are
    renumbered by size, largest first, so that "cluster 0" means the same thing whatever the
    seed found first.
    """
    if x.ndim != 2:
        raise TargetError(f"activations must be [units, features], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise TargetError(f"cannot make {k} clusters of {n} units (k must be 1-{n})")
    if not torch.isfinite(x).all():
        raise TargetError("activations hold NaN or inf: record them again")
    data = x.detach().to(device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(max(1, restarts)):
        labels, c = _lloyd(data, _kmeanspp(data, k, g), iters)
        err = float(((data - c[labels]) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, labels, c)
    _, labels, c = best

    sizes = torch.bincount(labels, minlength=k)
    # Largest first, ties by old id: a stable sort of -size.
    order = torch.sort(-sizes, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return rank[labels], c[order].to(x.dtype)


def _kmeanspp(data: Tensor, k: int, g: torch.Generator) -> Tensor:
    n = data.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centres = [data[first]]
    d2 = ((data - data[first]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            nxt = int(torch.multinomial(d2, 1, generator=g))
        else:  # every point already sits on a centre: any will do
            nxt = int(torch.randint(n, (1,), generator=g))
        centres.append(data[nxt])
        d2 = torch.minimum(d2, ((data - data[nxt]) ** 2).sum(1))
    return torch.stack(centres)


def _lloyd(data: Tensor, c: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    n, k = data.shape[0], c.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max(1, iters)):
        dist = torch.cdist(data, c) ** 2
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            own = dist.gather(1, new[:, None]).flatten()
            own[counts[new] <= 1] = -1  # taking a lone point would empty its cluster
            far = int(own.argmax())
            new[far] = j
            counts = torch.bincount(new, minlength=k)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, data)
        c = sums / counts.clamp_min(1)[:, None].to(c.dtype)
    return labels, c


def cluster_mask(activations: Tensor, k: int, which: int, *, seed: int = 0, iters: int = 50,
                 n: int | None = None, what: str = "unit") -> Tensor:
    """Float mask [n_units]: 1 for units in k-means cluster `which` (0 = largest) of k."""
    if activations.ndim != 2:
        raise TargetError(f"activations must be [{what}s, features], got shape "
                          f"{tuple(activations.shape)}")
    if n is not None and activations.shape[0] != n:
        raise TargetError(f"activations cover {activations.shape[0]} {what}s, not {n} "
                          f"(record them for this layer again)")
    if not 0 <= which < k:
        raise TargetError(f"cluster {which} out of range 0-{k - 1}")
    labels, _ = kmeans(activations, k, seed=seed, iters=iters)
    return (labels == which).to(torch.float32)


# -- regions -------------------------------------------------------------------------------------
BOXES = {
    "full": (0.0, 0.0, 1.0, 1.0),
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "centre": (0.25, 0.25, 0.75, 0.75),
    "center": (0.25, 0.25, 0.75, 0.75),
}


def parse_box(spec) -> Tensor:
    """A region box [x0, y0, x1, y1] (float32, 0..1, x right, y down) from text or numbers."""
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in BOXES:
            vals = list(BOXES[name])
        else:
            parts = [p for p in re.split(r"[,\s]+", name) if p]
            try:
                vals = [float(p) for p in parts]
            except ValueError:
                raise TargetError(f"cannot read box {spec.strip()!r}: write x0, y0, x1, y1 in 0..1 "
                                  f"or one of {', '.join(BOXES)}") from None
    elif isinstance(spec, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        vals = [float(v) for v in spec]
    else:
        raise TargetError(f"box {spec!r} is not x0, y0, x1, y1")
    if len(vals) != 4:
        raise TargetError(f"box needs 4 numbers x0, y0, x1, y1, got {len(vals)}")
    if not all(0.0 <= v <= 1.0 for v in vals):  # NaN fails this too
        raise TargetError(f"box {vals} must lie in 0..1 (fractions of the picture)")
    x0, y0, x1, y1 = vals
    if x0 >= x1 or y0 >= y1:
        raise TargetError(f"box {vals} is empty: need x0 < x1 and y0 < y1")
    return torch.tensor(vals, dtype=torch.float32)
