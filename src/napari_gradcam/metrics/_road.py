"""ROAD: RemOve And Debias (Rong et al. 2022), with noisy linear imputation.

What is computed follows pytorch-grad-cam's ``pytorch_grad_cam.metrics.road`` (itself taken from
the authors' code), so that the numbers are comparable:

- at percentile p, with the map at the model's input size, the pixels whose heat is at or
  above the map's p-th percentile (``np.percentile``) are removed when the most relevant go
  first (MoRF): about the top (100 - p) %; least relevant first (LeRF) removes those at or
  above the p-th percentile of 1 - heat, the coldest (100 - p) %. Pixels tied at the
  threshold all go: for a Grad-CAM map that is 0 on 90 % of the image, MoRF removes *every*
  pixel at the percentiles below 90 (the threshold is 0 there) and LeRF the same 90 % of
  zeros at every percentile above 10, so such maps are best read at the percentiles beyond
  their zero share (or with a small tie-breaking noise added, as our parity test and
  benchmark do);
- every removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 along the
  axes, 1/12 on the diagonals; neighbours outside the image are left out and the weights of
  those inside are what the pixel's own weight sums), neighbours that are removed too being
  unknowns of the same linear system, solved exactly; then Gaussian noise of standard
  deviation ``noise`` (0.01 by default) is added to the imputed values. The imputation runs
  on the preprocessed input (after mean / std), every channel with the same system;
- the score is the change of the target's output: after imputation minus before. We report
  it for the probability (softmax / sigmoid, as the rest of the library) and the logit
  (what pytorch-grad-cam's ``ClassifierOutputTarget`` returns);
- combined: (LeRF - MoRF) / 2 of the changes averaged over the percentiles, as
  ``ROADCombined``.

Ours builds the sparse systems of a whole batch of images and percentiles at once with
vectorised index arithmetic (the peer fills a ``lil_matrix`` per image and percentile) and
solves them as one block-diagonal system with SciPy's sparse solver (one factorisation, every
channel a right-hand side). An image whose pixels are all removed (a constant map at a low
percentile) has no known neighbour to impute from: it becomes 0 (the normalisation's mean)
plus the noise, where the peer's solver fails on a singular system.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..explain_arrays import Progress, run_generator
from ..models import ModelSpec
from ._common import (
    Heatmaps,
    Model,
    check_targets,
    chosen_targets,
    class_label,
    index_of,
    progress,
    tolist,
)
from ._perturbation import _nhwc

# (row offset, column offset), weight: the authors' neighbour weights
NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
              ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# unknowns per sparse solve: one factorisation of a block-diagonal system of about this size
# stays within a few hundred MB
_SOLVE_UNKNOWNS = 1 << 20


def removed_masks(maps: np.ndarray, percentiles, most_relevant_first: bool) -> np.ndarray:
    """(n, H, W) maps -> (n, P, H, W) bool: the pixels removed at each percentile."""
    maps = np.asarray(maps, np.float32)
    ranked = maps if most_relevant_first else (np.float32(1) - maps)
    flat = ranked.reshape(ranked.shape[0], -1)
    thresholds = np.percentile(flat, list(percentiles), axis=1).astype(np.float32)  # (P, n)
    keep = flat[:, None, :] < thresholds.T[:, :, None]
    return ~keep.reshape(ranked.shape[0], len(percentiles), *ranked.shape[1:])


def impute(x: np.ndarray, removed: np.ndarray, noise: float = 0.01,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Noisy linear imputation of the ``removed`` pixels of every image at once.

    ``x`` (B, C, H, W) values, ``removed`` (B, H, W) bool; returns float32 (B, C, H, W).
    ``rng``: one generator for all the noise, or a sequence of B, one per image (each image's
    noise then depends on its own generator only, not on the images before it).
    """
    x = np.asarray(x)
    b, c, h, w = x.shape
    removed = np.asarray(removed, bool)
    out = np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(b * h * w, c),
                               dtype=np.float64).copy()
    miss = removed.reshape(-1).copy()
    everything = removed.reshape(b, -1).all(1)
    if everything.any():  # nothing known to impute from: the mean (0), plus the noise
        gone = np.repeat(everything, h * w)
        out[gone] = 0.0
        miss &= ~gone
    lost = np.flatnonzero(removed.reshape(-1))
    pixels = np.flatnonzero(miss)
    if pixels.size:
        blocks = pixels // (h * w)
        cuts = _solve_groups(blocks, b)
        for lo, hi in cuts:
            out[pixels[lo:hi]] = _solve(out, miss, pixels[lo:hi], h, w, c)
    if noise and lost.size:
        if isinstance(rng, (list, tuple)):
            if len(rng) != b:
                raise ValueError(f"impute got {len(rng)} generators for {b} images; give one "
                                 "generator, or one per image.")
            cuts = np.searchsorted(lost // (h * w), np.arange(b + 1))
            for i, gen in enumerate(rng):
                mine = lost[cuts[i]:cuts[i + 1]]
                out[mine] += float(noise) * gen.standard_normal((mine.size, c))
        else:
            rng = rng if rng is not None else np.random.default_rng()
            out[lost] += float(noise) * rng.standard_normal((lost.size, c))
    return out.reshape(b, h, w, c).transpose(0, 3, 1, 2).astype(np.float32)


def _fingerprint(x: np.ndarray) -> int:
    """A 64-bit number of an image's pixels, to seed its noise by what it is, not where."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(x).tobytes(),
                                          digest_size=8).digest(), "little")


def _solve_groups(blocks: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Runs of whole images (their unknowns are consecutive) of about _SOLVE_UNKNOWNS each."""
    starts = np.searchsorted(blocks, np.arange(count + 1))
    cuts, lo = [], 0
    for img in range(1, count + 1):
        if starts[img] - starts[lo] >= _SOLVE_UNKNOWNS or img == count:
            if starts[img] > starts[lo]:
                cuts.append((int(starts[lo]), int(starts[img])))
            lo = img
    return cuts


def _solve(values: np.ndarray, miss: np.ndarray, pixels: np.ndarray, h: int, w: int,
           c: int) -> np.ndarray:
    """The imputed values (len(pixels), c) of the flat ``pixels`` (whole images' unknowns)."""
    m = pixels.size
    unknown = np.full(miss.size, -1, np.int64)
    unknown[pixels] = np.arange(m)
    p = pixels % (h * w)
    row, col = p // w, p % w
    diagonal = np.zeros(m)
    rhs = np.zeros((m, c))
    rows, cols, weights = [], [], []
    ids = np.arange(m)
    for (dr, dc), weight in NEIGHBOURS:
        rr, cc = row + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        at = ids[inside]
        q = pixels[inside] + dr * w + dc
        diagonal[at] += weight
        known = ~miss[q]
        rhs[at[known]] -= weight * values[q[known]]
        rows.append(at[~known])
        cols.append(unknown[q[~known]])
        weights.append(np.full(int((~known).sum()), weight))
    rows.append(ids)
    cols.append(ids)
    weights.append(-diagonal)
    import scipy.sparse as sp  # imported when an image is imputed, not with the module
    from scipy.sparse.linalg import spsolve

    a = sp.csc_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(m, m))
    solution = spsolve(a, rhs)
    return np.asarray(solution).reshape(m, c)


@dataclass
class Road:
    """ROAD scores of every image.

    ``percentiles`` (P,). ``morf`` / ``lerf`` (*lead, P): the change of the target's
    probability (after imputation minus before) when the most / least relevant pixels are
    removed at each percentile (None when not computed); ``*_logits`` the change of the
    logit (pytorch-grad-cam's ``ClassifierOutputTarget`` score). ``combined`` (*lead):
    (mean LeRF - mean MoRF) / 2 over the percentiles, of the probability (only with both).
    ``removed`` (P,): the mean share of pixels removed at each percentile.
    ``probability`` (*lead): the unperturbed image's probability of the target.
    """

    percentiles: np.ndarray
    morf: np.ndarray | None
    lerf: np.ndarray | None
    morf_logits: np.ndarray | None
    lerf_logits: np.ndarray | None
    probability: np.ndarray
    removed: np.ndarray
    class_ids: np.ndarray
    class_names: list
    settings: dict = field(default_factory=dict)

    @property
    def combined(self) -> np.ndarray | None:
        if self.morf is None or self.lerf is None:
            return None
        return (self.lerf.mean(-1) - self.morf.mean(-1)) / 2

    def rows(self) -> list[dict]:
        """One row per image: index, class, class_id, probability, and the mean change over
        the percentiles of MoRF and LeRF (``road_morf``, ``road_lerf``) and ``road_combined``,
        those computed."""
        lead = self.class_ids.shape
        combined = self.combined
        out = []
        for k in range(int(np.prod(lead, dtype=np.int64))):
            idx = np.unravel_index(k, lead) if lead else ()
            cid = int(self.class_ids[idx])
            row = {"index": index_of(k, lead), "class": class_label(self.class_names, cid),
                   "class_id": cid, "probability": float(self.probability[idx])}
            if self.morf is not None:
                row["road_morf"] = float(self.morf[idx].mean())
            if self.lerf is not None:
                row["road_lerf"] = float(self.lerf[idx].mean())
            if combined is not None:
                row["road_combined"] = float(combined[idx])
            out.append(row)
        return out

    def summary(self) -> dict:
        out = {"images": int(self.probability.size)}
        for name in ("morf", "lerf"):
            v = getattr(self, name)
            if v is not None:
                out[f"road_{name}"] = float(v.mean())
        if self.combined is not None:
            out["road_combined"] = float(self.combined.mean())
        return out

    def as_dict(self) -> dict:
        return {**{k: tolist(v) for k, v in self.__dict__.items()},
                "combined": tolist(self.combined)}


def _orders(most_relevant_first) -> list[bool]:
    if isinstance(most_relevant_first, str) and most_relevant_first.lower() == "both":
        return [True, False]
    if isinstance(most_relevant_first, (bool, np.bool_)):
        return [bool(most_relevant_first)]
    raise ValueError(f"most_relevant_first={most_relevant_first!r}: give True (MoRF), False "
                     "(LeRF) or 'both'.")


def _check_percentiles(percentiles) -> np.ndarray:
    try:
        p = np.asarray(percentiles, np.float64).reshape(-1)
    except (TypeError, ValueError):
        p = np.array([np.nan])
    if p.size == 0 or not np.isfinite(p).all() or (p < 0).any() or (p > 100).any():
        raise ValueError(f"percentiles={percentiles!r}: give numbers from 0 to 100, e.g. "
                         "(10, 20, ..., 90).")
    return p


def iter_road(images, spec: ModelSpec, heatmaps, targets=None, percentiles=PERCENTILES,
              most_relevant_first=True, *, noise: float = 0.01, seed: int | None = 0,
              device="auto", batch_size: int | None = None, channel_axis=None):
    """:func:`road` as a generator of :class:`Progress` (one per batch of images)."""
    orders = _orders(most_relevant_first)
    pct = _check_percentiles(percentiles)
    try:
        bad_noise = isinstance(noise, bool) or not np.isfinite(float(noise)) or float(noise) < 0
    except (TypeError, ValueError):
        bad_noise = True
    if bad_noise:
        raise ValueError(f"noise={noise!r}: give the imputation noise's standard deviation, "
                         ">= 0 (0.01 as ROAD's authors).")
    model = Model(spec, device, batch_size)
    if model.runner.dims != 2:
        raise ValueError("ROAD imputes pixels from their 8 neighbours in a plane, so it takes "
                         "2D models; for a 3D model use deletion_insertion.")
    images, lay, n = model.layout(images, channel_axis)
    heat = Heatmaps(heatmaps, lay, n)
    fixed = check_targets(targets, spec, lay.lead, n)
    size = model.input_size(lay)
    model.batch_size(lay, n * (1 + len(orders) * pct.size))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or seed < 0):
        raise ValueError(f"seed={seed!r}: give a whole number >= 0, or None for fresh noise.")
    # one generator per image and perturbed copy, seeded by the seed, the image's own pixels and
    # the copy: an image's noise (and so its scores) is the same alone, anywhere in a stack and
    # in any batch size
    root = np.random.SeedSequence().entropy if seed is None else int(seed)
    P, O = pct.size, len(orders)
    changes = np.zeros((n, O, P))
    logit_changes = np.zeros((n, O, P))
    base = np.zeros(n)
    removed_share = np.zeros((O, P))
    ids = np.zeros(n, np.int64)
    for start, stop, x in model.batches(images, lay):
        m = stop - start
        maps = heat.on_input(start, stop, size, x.device).cpu().numpy()
        xs = x.detach().float().cpu().numpy()
        removed = np.stack([removed_masks(maps, pct, o) for o in orders], 1)  # (m, O, P, H, W)
        removed_share += removed.reshape(m, O, P, -1).mean(-1).sum(0)
        gens = [np.random.default_rng([root, _fingerprint(xs[k]), copy]) for k in range(m)
                for copy in range(O * P)]
        filled = impute(np.repeat(xs, O * P, axis=0), removed.reshape(m * O * P, *size), noise,
                        gens)
        perturbed = torch.from_numpy(filled).to(x.device)

        def build(a: int, b: int, x=x, perturbed=perturbed, m=m):
            parts = [x[a:min(b, m)]] if a < m else []
            if b > m:  # the unperturbed images first, then every percentile's imputed copy
                parts.append(perturbed[max(a, m) - m:b - m])
            return _nhwc(torch.cat(parts) if len(parts) > 1 else parts[0])

        logits = model.logits(m + m * O * P, build)
        first = logits[:m]
        chosen = chosen_targets(fixed, start, stop, first.argmax(-1))
        p0, l0 = model.scores(first, chosen)
        p1, l1 = model.scores(logits[m:].view(m, O, P, -1), chosen[:, None, None])
        changes[start:stop] = p1 - p0[:, None, None]
        logit_changes[start:stop] = l1 - l0[:, None, None]
        base[start:stop] = p0
        ids[start:stop] = chosen
        yield progress(stop, n, "ROAD", model)
    lead = lay.lead
    pick = {o: k for k, o in enumerate(orders)}

    def part(values, order):
        return values[:, pick[order]].reshape(*lead, P) if order in pick else None

    return Road(pct, part(changes, True), part(changes, False), part(logit_changes, True),
                part(logit_changes, False), base.reshape(lead),
                removed_share.mean(0) / n, ids.reshape(lead),
                list(spec.class_names),
                {"noise": float(noise), "seed": seed, "orders": ["MoRF" if o else "LeRF"
                                                                  for o in orders],
                 "device": str(model.device)})


def road(images, spec: ModelSpec, heatmaps, targets=None, percentiles=PERCENTILES,
         most_relevant_first=True, *, noise: float = 0.01, seed: int | None = 0,
         device="auto", batch_size: int | None = None, channel_axis=None,
         progress: Callable[[Progress], None] | None = None) -> Road:
    """ROAD (Rong et al. 2022): the change of the target's score when the most relevant
    (``most_relevant_first=True``, MoRF), least relevant (False, LeRF) or both (``"both"``,
    which also gives the combined score) pixels are removed and imputed from their
    neighbours, at each percentile of the map.

    See the module's docstring for exactly which pixels go and how they are imputed
    (pytorch-grad-cam's ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` recipe, in the
    model's input space, heatmaps resized to the input size). ``noise`` is the imputation
    noise's standard deviation, ``seed`` seeds it (None: fresh noise each call); each image
    draws its noise from a generator of its own (the seed and its pixels), so an image scores
    the same alone, anywhere in a stack and in any batch size. Other
    parameters as for :func:`deletion_insertion`; ``batch_size`` counts inputs per forward.
    """
    return run_generator(iter_road(
        images, spec, heatmaps, targets, percentiles, most_relevant_first, noise=noise,
        seed=seed, device=device, batch_size=batch_size, channel_axis=channel_axis), progress)
