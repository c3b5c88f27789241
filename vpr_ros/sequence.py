"""Sequence matching, ROS-free: where along the map a run of query frames fits best.

One frame is often not enough (cross-season Nordland: 13.5 % single-frame Recall@1 with
patch-normalised pixels), but the order in which places are seen is very distinctive.
``SequenceMatcher`` matches the stream of query descriptors against the map's keyframe
order frame by frame (``update``, for the node); ``match_traverse`` runs exactly that over
a whole query traverse (for evaluate and the benchmark).

Per query frame:

1. **Differences.** Euclidean distance from the query descriptor to every map place
   (unit descriptors: ``sqrt(2 - 2 cos)``), over the model's global descriptors or the
   cheap ``patch_normalised_descriptor`` (``conf.descriptor``).
2. **Local contrast enhancement** (SeqSLAM): each distance becomes a z-score over the
   places within ``contrast_window`` keyframes of it in its traverse, so a place counts
   for being better than its neighbours, not for being close in absolute terms.
3. **Query motion.** ``step`` = how far the query descriptor moved since the previous
   frame. Relative to the map's median keyframe-to-keyframe step it gives the frame's
   *weight* ``w`` in [0, 1]: a frame that barely differs from the previous one (the robot
   stands still) brings little new evidence, so it adds ``w`` times its costs (otherwise
   a wrong place that happens to match a stationary view collects that luck again and
   again). Relative to the map's keyframe steps at each place it tells whether the robot
   advanced there.
4. **Dynamic programming** (Viterbi, in costs) over places with a local motion model:
   from one query frame to the next a trajectory advances 0..``max_step`` keyframes
   within its traverse.

   * Staying costs ``stop_penalty`` times the fraction of the step out of the place that
     the query moved (capped at 1): free when the robot stopped, expensive when the
     images changed by a keyframe step (a trajectory sitting on one place while the view
     changes is the classic way a wrong place collects evidence).
   * Advancing into a place is free once the query moved half of the step into it, and
     costs up to ``skip_penalty`` in proportion to the shortfall (so a stopped robot does
     not drift forward, while advancing through near-duplicate keyframes, where the map
     itself stood nearly still, stays free).
   * Each keyframe skipped beyond one costs ``skip_penalty``.

   Trajectories never cross between traverses: each traverse is preceded by ``max_step``
   padding slots of infinite cost, so the shifted arrays of the vectorised recursion
   never reach across.
5. **Memory** (``conf.memory``). ``'decay'``, the recursive filter form: the recursion
   runs over the whole history and the past is multiplied by ``gamma = 1 - w / length``
   each frame, so the frame weights sum to ``length`` and a stop (w = 0) forgets nothing;
   O(N) per frame. ``'window'``, SeqSLAM's view: the best trajectory over the most recent
   frames whose weights sum to ``length`` (``length`` frames while moving; at most
   ``4 * length`` frames are kept, so a longer stop ends the window), recomputed every
   frame from the kept difference vectors: O(length x N). Decay carries a good match
   through stretches where the images say little; it also takes a little longer to let go
   when the route leaves the map.

Scores and confidence. ``cost[j]`` is the best trajectory's weighted sum of enhanced
differences ending at place j, lower is better; ``score = -cost / W`` (W the sum of the
frame weights) is its mean z-score, higher is better. Its *evidence* ``E = -cost / sqrt(W2)``
(W2 the sum of the squared frame weights) is the same sum in noise units: the enhanced
differences of a query that shows none of the places are zero-mean, unit-variance z-scores,
so under that null hypothesis a given trajectory's ``E`` is about a standard normal. The
confidence is ``1 - exp(-margin / confidence_scale)``, the margin being how far ``E`` of the
best trajectory exceeds the larger of two references, which together stand for the best
trajectory an unrelated query would reach anywhere in the map:

* **relative** (observed): the best trajectory ending *elsewhere*, outside
  ``exclusion_window`` keyframes of the match in its traverse and, when place positions are
  given, farther than ``competitor_radius_m`` from it (so another traverse of the same route
  does not compete). On a route the map knows, the true trajectory beats them all by many
  noise units; it also rejects perceptual aliasing (two places that both fit).
* **absolute** (modelled): the places inside that region cannot be observed as competitors,
  since the match sits among them; their best evidence under the null is the maximum of R
  standard normals (R the region's places), of which the reference is the ``null_quantile``
  (default the median): ``E_null(R) = Phi^-1(null_quantile ** (1 / R))``, 1.5 for 11
  places, 1.85 for 21, computed in O(1).

On a large map the observed competitors dominate (Nordland, 3,576 places: the best
trajectory elsewhere typically reaches 3 noise units, ``E_null(21)`` is 1.85; R@1 does not
change, recall at 100 % precision by less than a point). On a small map they are few and
weak: 24 places and an exclusion window of 10 leave 3 to 13, and those at the start of the
traverse end trajectories that had to stand still and paid the stop penalty every frame.
There the best of all 24 trajectories beat them by many noise units even when no place
matched, and the relative margin alone accepted a route the map never saw (generated maps of
15 to 24 places, unrelated queries: 97 to 99 % of the frames with 'decay', 63 to 86 % with
'window'); the modelled region restores the comparison with all N (maps of 15 to 200
places: 'decay' accepted none of about 6,000 such frames, 'window', whose best trajectory
is chosen afresh every frame, at most 0.6 %). A map within one exclusion window (11
keyframes or fewer) has no competitors at all and is judged by the absolute part alone.
With ``null_quantile: 0`` the confidence is the relative margin alone (and 0 with nothing
elsewhere to compare with), as before.

The absolute part is a model, not a bound. It treats each place's evidence as one standard
normal, but a place's cost is already the best of many trajectories ending there, so for
unrelated queries the best ``E`` runs somewhat above it (measured on 2,000 places: median
3.7 with 'decay', 3.5 with 'window', against a modelled 3.4): the modelled reference can
err towards higher confidence, and the observed competitors are what keep large maps safe.
Where neighbouring keyframes look alike (Nordland) the region holds fewer independent
trajectories and ``E_null`` is instead a little high.

Why not the raw similarity against the map's own inter-place similarity: a season change
lowers every query-to-map similarity (Nordland: unrelated winter-to-summer pairs 0.075 on
average, summer-to-summer 0.136, true pairs 0.26),
so correct cross-season trajectories sit barely above the map's own level (at ``length``
10, a quarter of them less than 2.8 noise units above it, as little as the best trajectory
of a 24-place map for images it never saw); a test on it would reject them. The z-scores
need no such model: their null distribution is known.

Cost per frame: the search is vectorised over all N places, no retrieval preselection
(so it cannot lose the true place to a bad single-frame ranking): O(N x D) for the
distances, O(N x (max_step + 1)) per DP step ('decay': one step, 'window': one per kept
frame), O(N) per returned match for its region and competitors; the chance level adds
O(1) per match (one inverse normal CDF per region size, memoised).
``benchmarks/sequence_nordland.py`` prints the time per frame for 3,576 and 100,000 places.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import cv2
import numpy as np

from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError

SEQUENCE_DESCRIPTORS = ('patch_norm', 'global')
SEQUENCE_MEMORIES = ('decay', 'window')


@dataclass(frozen=True)
class SequenceConf(Conf):
    """Settings of the sequence matcher (see the module docstring for what each does)."""

    descriptor: str = option(
        'patch_norm',
        "What is matched: 'patch_norm' (cheap image descriptor stored in maps by build_map; "
        "the map's own image settings override image_size and patch) or 'global' (the "
        "model's global descriptors)",
        choices=SEQUENCE_DESCRIPTORS,
    )
    image_size: list[int] = option(
        [64, 32], 'patch_norm: (width, height) the image is resized to', unit='px', min=1, length=2
    )
    patch: int = option(8, 'patch_norm: side of the normalised square patches', unit='px', min=1)
    length: int = option(10, 'Sequence length (sum of the frame weights)', unit='frames', min=1)
    memory: str = option(
        'decay',
        "'decay' (recursive, O(N) per frame) or 'window' (SeqSLAM's view)",
        choices=SEQUENCE_MEMORIES,
    )
    max_step: int = option(
        2, 'Keyframes a trajectory may advance per query frame', unit='keyframes', min=1
    )
    stop_penalty: float = option(
        4.0, 'Cost of staying while the query moved a keyframe step', unit='z units', min=0.0
    )
    skip_penalty: float = option(
        2.0, 'Cost per keyframe skipped, or advanced without moving', unit='z units', min=0.0
    )
    contrast_window: int = option(
        5,
        'Keyframes each side for local contrast enhancement (0: global)',
        unit='keyframes',
        min=0,
    )
    exclusion_window: int = option(
        10, 'Keyframes each side of a match that do not compete with it', unit='keyframes', min=0
    )
    competitor_radius_m: float = option(
        10.0, 'Places nearer than this to a match do not compete with it', unit='m', min=0.0
    )
    confidence_scale: float = option(
        2.0,
        'Margin at which the confidence reaches 1 - 1/e',
        unit='noise units',
        min=0.0,
        min_exclusive=True,
    )
    null_quantile: float = option(
        0.5,
        'Absolute part of the confidence: a match must also beat this quantile of the best '
        'evidence unrelated images reach over the places too near it to compete; it guards '
        'small maps, where few places compete (0: relative confidence only)',
        min=0.0,
        max=0.999999,
    )
    min_confidence: float = option(
        0.6, 'Matches below this confidence are not accepted', min=0.0, max=1.0
    )
    top_k: int = option(5, 'Matches returned per frame (best first)', min=1)

    def validate(self) -> None:
        width, height = self.image_size
        if width % self.patch or height % self.patch:
            msg = (
                f'image_size must be [width, height], multiples of patch {self.patch!r}, '
                f'got {self.image_size!r}'
            )
            raise ConfigError(msg)


class SequenceMatch(NamedTuple):
    """One answer of the sequence matcher for the latest query frame.

    ``place_index`` indexes the map's places (rows of the map descriptors); ``score`` is
    the mean enhanced similarity (z-score) of the trajectory ending there, higher is
    better; ``confidence`` in [0, 1) is how far the trajectory beats every trajectory
    ending elsewhere and what unrelated images reach by chance (0 for any answer but the
    best).
    """

    place_index: int
    score: float
    confidence: float


def patch_normalised_descriptor(
    images: Sequence[np.ndarray] | np.ndarray,
    size: tuple[int, int] = (64, 32),
    patch: int = 8,
) -> np.ndarray:
    """The cheap SeqSLAM image descriptor: patch-normalised downsampled grey pixels.

    Each image is turned grey, resized to ``size`` (``cv2.INTER_AREA`` when shrinking),
    cut into ``patch`` x ``patch`` squares that are each brought to zero mean and unit
    standard deviation (a flat patch becomes zeros), flattened and L2-normalised (an image
    without any texture gives a zero vector, which matches nothing better than anything
    else).

    Args:
        images: RGB ``uint8`` images (H, W, 3) or grey ones (H, W), as a list or an array
            (N, H, W, 3) or (N, H, W); one image alone is a batch of one.
        size: (width, height) after resizing, both multiples of ``patch``.
        patch: side of the normalised patches, in pixels of the resized image.

    Returns:
        (N, width * height) float32 descriptors.

    Raises:
        ValueError: if ``size`` is not a multiple of ``patch`` or an image has a bad shape.
    """
    width, height = (int(v) for v in size)
    if patch < 1 or width < patch or height < patch or width % patch or height % patch:
        msg = f'size {size!r} must be positive multiples of patch {patch!r}'
        raise ValueError(msg)
    if isinstance(images, np.ndarray) and (
        images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3))
    ):
        images = [images]  # one image, not a batch
    greys = np.empty((len(images), height, width), np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] == 3:
            image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        elif image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim != 2 or image.size == 0:
            msg = f'expected an RGB (H, W, 3) or grey (H, W) image, got shape {image.shape!r}'
            raise ValueError(msg)
        if image.shape != (height, width):
            shrinking = image.shape[0] > height or image.shape[1] > width
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            image = cv2.resize(image, (width, height), interpolation=interpolation)
        greys[i] = image
    patches = greys.reshape(len(greys), height // patch, patch, width // patch, patch)
    mean = patches.mean(axis=(2, 4), keepdims=True)
    std = patches.std(axis=(2, 4), keepdims=True)
    patches = np.where(std > 1e-6, (patches - mean) / np.maximum(std, 1e-6), 0.0)
    descriptors = patches.reshape(len(greys), -1).astype(np.float32)
    norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
    unit: np.ndarray = descriptors / np.maximum(norms, 1e-12)
    return unit


def sequence_image_descriptors(
    images: Sequence[np.ndarray] | np.ndarray, conf: SequenceConf | Mapping[str, Any] | None = None
) -> np.ndarray:
    """The patch-normalised descriptors a ``'patch_norm'`` configuration matches with.

    Raises:
        ConfigError: if the configuration matches global (model) descriptors instead.
    """
    conf = as_sequence_conf(conf)
    if conf.descriptor != 'patch_norm':
        msg = (
            f'descriptor {conf.descriptor!r} uses the model global descriptors; '
            f"image descriptors exist only for 'patch_norm'"
        )
        raise ConfigError(msg)
    width, height = conf.image_size
    return patch_normalised_descriptor(images, (width, height), conf.patch)


def as_sequence_conf(conf: SequenceConf | Mapping[str, Any] | None) -> SequenceConf:
    """``conf`` as validated settings (a mapping holds overrides of the defaults)."""
    return conf if isinstance(conf, SequenceConf) else SequenceConf.from_dict(conf)


@dataclass(frozen=True)
class KeyframeOrder:
    """A map's places grouped by traverse, each traverse in keyframe order: the layout the
    sequence matcher and the place filter walk.

    Attributes:
        order: (N,) sorted position -> place index (traverses contiguous, stable).
        new_traverse: (N,) bool, a traverse starts at this sorted position.
        first: (N,) the sorted position where each place's traverse starts.
        last: (N,) one past where it ends.
    """

    order: np.ndarray
    new_traverse: np.ndarray
    first: np.ndarray
    last: np.ndarray

    @classmethod
    def of(cls, traverse_ids: np.ndarray) -> KeyframeOrder:
        traverse_ids = np.asarray(traverse_ids).reshape(-1)
        order = np.argsort(traverse_ids, kind='stable')
        sorted_traverse = traverse_ids[order]
        new_traverse = np.r_[True, sorted_traverse[1:] != sorted_traverse[:-1]]
        number = np.cumsum(new_traverse) - 1
        starts = np.flatnonzero(new_traverse)
        ends = np.r_[starts[1:], len(order)]
        return cls(order, new_traverse, starts[number], ends[number])

    def windows(self, half_width: int) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) sorted positions within ``half_width`` keyframes of each place, inside
        its traverse."""
        position = np.arange(len(self.order))
        lo = np.maximum(position - half_width, self.first)
        hi = np.minimum(position + half_width + 1, self.last)
        return lo, hi


@dataclass(frozen=True)
class KeyframeSteps:
    """How far descriptors move from keyframe to keyframe (sorted order), which the motion
    models compare with the query's step.

    Attributes:
        reference: the map's median keyframe step (1 when it has none).
        half_step_in: (N,) half the step into each place from its predecessor (the
            reference where there is none, and at most that).
        inverse_step_out: (N,) 1 / the step out of it to its successor (likewise; floored
            at 5 % of the reference, so a map that stood still keeps a step scale).
    """

    reference: float
    half_step_in: np.ndarray
    inverse_step_out: np.ndarray

    @classmethod
    def of(cls, descriptors: np.ndarray, layout: KeyframeOrder) -> KeyframeSteps:
        steps = consecutive_distances(descriptors, layout.order)
        steps[layout.new_traverse[1:]] = np.nan
        known = steps[np.isfinite(steps) & (steps > 1e-6)]
        reference = float(np.median(known)) if len(known) else 1.0
        # fmin ignores NaN: no predecessor or successor gives the reference.
        step_in = np.fmin(np.r_[np.nan, steps], reference)
        step_out = np.fmin(np.r_[steps, np.nan], reference)
        return cls(reference, 0.5 * step_in, 1.0 / np.maximum(step_out, 0.05 * reference))


class SequenceMatcher:
    """Online sequence matcher over a map's keyframe order (see the module docstring).

    Args:
        map_descriptors: (N, D) descriptors of the map's places, in keyframe order within
            each traverse (L2-normalised; they are normalised here if they are not).
        traverse_ids: (N,) traverse of each place (default: all one traverse). Places of
            one traverse need not be contiguous, but must be in keyframe order.
        conf: settings, or a mapping of overrides of the defaults.
        place_xyz: optional (N, 2 or 3) place positions in metres (NaN: unknown), used to
            keep other traverses' copies of the matched place from competing with it.

    Attributes:
        conf: the merged, validated configuration.
        frames_seen: query frames since the last ``reset``.
        reference_step: the map's median keyframe-to-keyframe descriptor distance.
        last_costs: (N,) best trajectory cost ending at each place after the last update
            (lower is better; inf where no trajectory fits), for diagnostics.
        last_timings: seconds the last update spent on the differences (distances and
            contrast enhancement) and on the sequence part (DP, matches).

    Raises:
        ConfigError: on a bad configuration.
        ValueError: on descriptors or traverse ids of the wrong shape.
    """

    def __init__(
        self,
        map_descriptors: np.ndarray,
        traverse_ids: np.ndarray | None = None,
        conf: SequenceConf | Mapping[str, Any] | None = None,
        *,
        place_xyz: np.ndarray | None = None,
    ) -> None:
        self.conf = as_sequence_conf(conf)
        descriptors = np.asarray(map_descriptors, np.float32)
        if descriptors.ndim != 2 or len(descriptors) == 0:
            msg = f'map descriptors must be (N, D) with N >= 1, got shape {descriptors.shape!r}'
            raise ValueError(msg)
        num_places = len(descriptors)
        if traverse_ids is None:
            traverse_ids = np.zeros(num_places, np.int64)
        traverse_ids = np.asarray(traverse_ids).reshape(-1)
        if len(traverse_ids) != num_places:
            msg = f'{len(traverse_ids)!r} traverse ids for {num_places!r} places'
            raise ValueError(msg)
        if place_xyz is not None:
            place_xyz = np.asarray(place_xyz, np.float64)
            if place_xyz.ndim != 2 or len(place_xyz) != num_places:
                msg = f'place_xyz must be (N, 2 or 3) for {num_places!r} places, got shape '
                msg += f'{place_xyz.shape!r}'
                raise ValueError(msg)
        self._descriptors = _unit_rows(descriptors)
        self._place_xyz = place_xyz
        self.num_places = num_places

        # Internal layout: each traverse's places contiguous, in keyframe order, preceded by
        # `pad` always-infinite slots so that shifts by <= max_step never cross traverses.
        pad = self.conf.max_step
        layout = KeyframeOrder.of(traverse_ids)
        order = layout.order
        traverse_number = np.cumsum(layout.new_traverse) - 1
        self._order = order  # sorted position -> place index
        self._slot = np.arange(num_places) + pad * (traverse_number + 1)  # sorted -> slot
        self._num_slots = num_places + pad * (int(traverse_number[-1]) + 1)
        self._pad = pad
        # Keyframe window of each place inside its traverse (sorted positions, [lo, hi)).
        self._contrast_lo, self._contrast_hi = layout.windows(self.conf.contrast_window)
        self._exclusion_lo, self._exclusion_hi = layout.windows(self.conf.exclusion_window)
        self._sorted_of_place = np.empty(num_places, np.int64)
        self._sorted_of_place[order] = np.arange(num_places)
        steps = KeyframeSteps.of(self._descriptors, layout)
        self.reference_step = steps.reference
        self._half_step_in = self._slot_array(steps.half_step_in, pad)
        self._inverse_step_out = self._slot_array(steps.inverse_step_out, pad)

        self._null_levels: dict[int, float] = {}
        self._window: deque[tuple[np.ndarray, float, float]] = deque()
        self.reset()

    def _slot_array(self, values: np.ndarray, pad: int, fill: float = 1.0) -> np.ndarray:
        """Per-place values (in sorted order) in the slot layout, leading pad dropped."""
        out = np.full(self._num_slots, fill, np.float32)
        out[self._slot] = values
        return out[pad:]

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the query frames seen so far (e.g. after a teleport or a new session)."""
        self._window.clear()
        self._state: np.ndarray | None = None
        self._previous_query: np.ndarray | None = None
        self._weight_sum = 0.0
        self._weight_sq_sum = 0.0
        self.frames_seen = 0
        self.last_costs: np.ndarray | None = None
        self.last_timings: dict[str, float] = {}

    # -- one frame -----------------------------------------------------------------------

    def update(self, query_descriptor: np.ndarray) -> list[SequenceMatch]:
        """Add the next query frame and match the sequence that ends with it.

        Args:
            query_descriptor: (D,) descriptor of the same kind as the map's.

        Returns:
            Up to ``top_k`` matches, best first, at most one per exclusion window.

        Raises:
            ValueError: if the descriptor has the wrong size or is not finite.
        """
        query = np.asarray(query_descriptor, np.float32).reshape(-1)
        if query.shape[0] != self._descriptors.shape[1]:
            msg = (
                f'query descriptor has {query.shape[0]!r} values, '
                f'the map descriptors {self._descriptors.shape[1]!r}'
            )
            raise ValueError(msg)
        if not np.all(np.isfinite(query)):
            raise ValueError('query descriptor has non-finite values')
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        start = time.perf_counter()
        if self._previous_query is None:
            step, weight = 0.0, 1.0
        else:
            step = float(np.linalg.norm(query - self._previous_query))
            weight = min(step / self.reference_step, 1.0)
        costs = self._frame_costs(query, weight)
        differences_done = time.perf_counter()
        self._previous_query = query
        self.frames_seen += 1
        length = self.conf.length
        if self.conf.memory == 'window':
            self._window.append((costs, step, weight))
            total = sum(frame[2] for frame in self._window)
            while len(self._window) > 1 and (
                total - self._window[0][2] >= length or len(self._window) > 4 * length
            ):
                total -= self._window.popleft()[2]
            state = self._window[0][0]
            for frame_costs, frame_step, _ in list(self._window)[1:]:
                state = self._step(state, frame_costs, frame_step, 1.0)
            self._weight_sum = total
            self._weight_sq_sum = sum(frame[2] ** 2 for frame in self._window)
        else:
            gamma = 1.0 - weight / length
            if self._state is None:
                state = costs
            else:
                state = self._step(self._state, costs, step, gamma)
            self._weight_sum = weight + gamma * self._weight_sum
            self._weight_sq_sum = weight**2 + gamma**2 * self._weight_sq_sum
        self._state = state
        place_costs = np.empty(self.num_places, np.float64)
        place_costs[self._order] = state[self._slot]
        self.last_costs = place_costs
        matches = self._matches(place_costs)
        self.last_timings = {
            'differences_s': differences_done - start,
            'sequence_s': time.perf_counter() - differences_done,
        }
        return matches

    def _frame_costs(self, query: np.ndarray, weight: float) -> np.ndarray:
        """Weighted enhanced differences of a query to every place (padded slot layout)."""
        similarity = self._descriptors @ query
        distance = np.sqrt(np.maximum(2.0 - 2.0 * similarity.astype(np.float64), 0.0))
        distance = distance[self._order]
        if self.conf.contrast_window > 0:
            enhanced = local_zscore(distance, self._contrast_lo, self._contrast_hi)
        else:
            enhanced = (distance - distance.mean()) / max(float(distance.std()), 1e-6)
        costs = np.full(self._num_slots, np.inf, np.float32)
        costs[self._slot] = np.float32(weight) * enhanced
        return costs

    def _step(self, state: np.ndarray, costs: np.ndarray, step: float, gamma: float) -> np.ndarray:
        """One Viterbi step: best predecessor within max_step keyframes, plus this frame.

        Args:
            state: (slots,) best trajectory cost ending at each slot after the last frame.
            costs: (slots,) this frame's weighted costs.
            step: how far the query descriptor moved since the last frame.
            gamma: how much of the past is kept (1 for the window).
        """
        pad = self._pad
        # Staying costs stop_penalty times the query's motion in steps out of the place.
        moved_out = np.minimum(np.float32(step) * self._inverse_step_out, np.float32(1.0))
        best = state[pad:] + np.float32(self.conf.stop_penalty) * moved_out
        skip_penalty = np.float32(self.conf.skip_penalty)
        # Advancing into a place costs up to skip_penalty when the query moved less than
        # half of the step into it (it looks as if the robot stopped), in proportion to
        # the shortfall (so advancing into a near-duplicate keyframe costs ~0) ...
        short = None
        if 2.0 * step < self.reference_step:
            short = np.maximum(self._half_step_in - np.float32(step), np.float32(0.0))
            short *= skip_penalty / np.float32(0.5 * self.reference_step)
        for k in range(1, self.conf.max_step + 1):
            shifted = state[pad - k : len(state) - k]
            if short is not None:
                shifted = shifted + short
            if k > 1:  # ... and each place skipped costs skip_penalty.
                shifted = shifted + skip_penalty * np.float32(k - 1)
            np.minimum(best, shifted, out=best)
        out = np.empty_like(state)
        out[:pad] = np.inf
        if gamma != 1.0:
            best *= np.float32(gamma)
        np.add(costs[pad:], best, out=out[pad:])
        return out

    def _matches(self, place_costs: np.ndarray) -> list[SequenceMatch]:
        """Best places, one per exclusion window, with scores and confidences."""
        remaining = place_costs.copy()
        matches: list[SequenceMatch] = []
        noise = math.sqrt(max(self._weight_sq_sum, 1e-12))
        for _ in range(min(self.conf.top_k, self.num_places)):
            place = int(np.argmin(remaining))
            cost = float(remaining[place])
            if not math.isfinite(cost):
                break
            region = self._region(place)
            # Absolute: the evidence above the chance level of the places too near to
            # compete (an infinite margin when null_quantile is 0).
            margin = -cost / noise - self._null_evidence(int(region.sum()))
            competitors = place_costs[~region]
            if len(competitors):  # relative: the best trajectory elsewhere
                margin = min(margin, (float(competitors.min()) - cost) / noise)
            if math.isinf(margin):
                confidence = 0.0  # nothing to compare with: no evidence either way
            else:
                confidence = 1.0 - math.exp(-max(margin, 0.0) / self.conf.confidence_scale)
            score = -cost / max(self._weight_sum, 1e-12)
            matches.append(SequenceMatch(place, score, confidence))
            remaining[region] = np.inf
        return matches

    def _null_evidence(self, num_places: int) -> float:
        """``null_evidence`` of ``num_places`` at the configured quantile, memoised."""
        if num_places not in self._null_levels:
            self._null_levels[num_places] = null_evidence(num_places, self.conf.null_quantile)
        return self._null_levels[num_places]

    def _region(self, place: int) -> np.ndarray:
        """Mask of the places that agree with ``place`` (do not compete with it)."""
        mask = np.zeros(self.num_places, bool)
        position = self._sorted_of_place[place]
        lo, hi = self._exclusion_lo[position], self._exclusion_hi[position]
        mask[self._order[lo:hi]] = True
        if self._place_xyz is not None and np.all(np.isfinite(self._place_xyz[place])):
            distance = np.linalg.norm(self._place_xyz - self._place_xyz[place], axis=1)
            with np.errstate(invalid='ignore'):
                mask |= distance < self.conf.competitor_radius_m
        return mask


def null_evidence(num_places: int, quantile: float = 0.5) -> float:
    """What the best of ``num_places`` trajectories reaches when the query matches none.

    Each trajectory's evidence (summed enhanced similarity in noise units) is then about a
    standard normal, so the best of n is below ``e`` with probability ``Phi(e) ** n``; this
    returns the ``e`` for which that probability is ``quantile``.

    Args:
        num_places: how many trajectories (end places) compete by chance.
        quantile: in [0, 1); 0 gives -inf (no absolute test).

    Returns:
        The evidence level in noise units (0 for one place at the median, 1.85 for 21, 3.55
        for 3,576).
    """
    if quantile <= 0.0 or num_places < 1:
        return -math.inf
    upper_tail = -math.expm1(math.log(quantile) / num_places)  # 1 - quantile ** (1 / n)
    return -NormalDist().inv_cdf(upper_tail)


def match_traverse(
    query_descriptors: np.ndarray,
    map_descriptors: np.ndarray,
    traverse_ids: np.ndarray | None = None,
    conf: SequenceConf | Mapping[str, Any] | None = None,
    *,
    place_xyz: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequence-match a whole query traverse, frame by frame, as the node would.

    Exactly ``SequenceMatcher.update`` applied to each query in turn (causal: the answer
    for frame i uses frames up to i only), so offline results are the online ones.

    Args:
        query_descriptors: (Q, D) query descriptors in the order they were taken.
        map_descriptors: (N, D) map descriptors (see ``SequenceMatcher``).
        traverse_ids: (N,) traverse of each place (default: one traverse).
        conf: settings, or a mapping of overrides of the defaults.
        place_xyz: optional (N, 2 or 3) place positions in metres.

    Returns:
        best_index (Q,) int64, score (Q,) float64 and confidence (Q,) float64 of the top
        match of each query frame.
    """
    queries = np.asarray(query_descriptors, np.float32)
    if queries.ndim != 2:
        msg = f'query descriptors must be (Q, D), got shape {queries.shape!r}'
        raise ValueError(msg)
    matcher = SequenceMatcher(map_descriptors, traverse_ids, conf, place_xyz=place_xyz)
    best = np.full(len(queries), -1, np.int64)
    score = np.full(len(queries), np.nan)
    confidence = np.zeros(len(queries))
    for i, query in enumerate(queries):
        matches = matcher.update(query)
        if matches:
            best[i], score[i], confidence[i] = matches[0]
    return best, score, confidence


def consecutive_distances(
    descriptors: np.ndarray, order: np.ndarray, chunk: int = 8192
) -> np.ndarray:
    """Distances between descriptors[order[i]] and descriptors[order[i + 1]], (N - 1,)."""
    out = np.empty(max(len(order) - 1, 0), np.float64)
    for start in range(0, len(out), chunk):
        stop = min(start + chunk, len(out))
        difference = descriptors[order[start + 1 : stop + 1]] - descriptors[order[start:stop]]
        out[start:stop] = np.linalg.norm(difference, axis=1)
    return out


def local_zscore(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(v - mean) / std of each value over its own window ``values[lo:hi]`` (O(N))."""
    values = values.astype(np.float64, copy=False)
    cumulative = np.concatenate(([0.0], np.cumsum(values)))
    cumulative_sq = np.concatenate(([0.0], np.cumsum(values * values)))
    count = (hi - lo).astype(np.float64)
    mean = (cumulative[hi] - cumulative[lo]) / count
    variance = (cumulative_sq[hi] - cumulative_sq[lo]) / count - mean * mean
    zscores: np.ndarray = (values - mean) / np.sqrt(np.maximum(variance, 1e-12))
    return zscores.astype(np.float32)


def _unit_rows(descriptors: np.ndarray) -> np.ndarray:
    """The rows L2-normalised (as is when they already are; zero rows, from flat images, stay)."""
    norms = np.linalg.norm(descriptors, axis=1)
    if np.all((np.abs(norms - 1.0) < 1e-3) | (norms == 0.0)):
        return np.ascontiguousarray(descriptors)
    return np.ascontiguousarray(descriptors / np.maximum(norms, 1e-12)[:, None])
