"""A recursive place filter: one belief over the map's places, fed by every frame.

The belief is a probability for each map place plus an explicit **off-map** state ("I do
not know where I am"). Each frame moves it (the motion model) and weighs it by what the
frame shows (the observation model); the answer is the most probable place and its
confidence is the posterior mass within reach of it (``competitor_radius_m``, or
``exclusion_window`` keyframes where places have no position).

Motion. With odometry the belief moves along each traverse by the distance travelled,
spread by ``odom_sigma_m + odom_sigma_per_m * distance``. Without it (no ``odom_topic``,
a gap, frames out of order) it moves along the map's keyframe order with the sequence
matcher's step prior: staying costs ``stop_penalty`` when the image changed by a keyframe
step, advancing without change costs ``skip_penalty`` (``vpr_ros.sequence``).

Kidnaps. Two models run side by side, as in an interacting-multiple-model filter: a
*tracking* model (the motion above) and a *relocalizing* one that assumes nothing about
where the robot was. Each frame they exchange ``switch_probability`` of their belief and
are weighted by how well each predicted the frame; when the evidence collapses (kidnap,
or queries with no order at all) the relocalizing model takes over and re-initialises
the tracking one.

Observations. Every source (the global descriptor's similarity, the patch-normalised
image descriptor's, the re-ranking score of the best candidates) is turned into a score
``u`` normalised against the map itself: the query's distance to each place as a z-score
over that place's keyframe neighbourhood (local contrast, as SeqSLAM), so no constant is
tuned to one dataset's score range. A place that matches scores about ``u ~ N(m, 1)``, one
that does not ``N(0, 1)``, which gives the likelihood ratio ``exp(m u - m^2 / 2)`` against
off-map. The signal ``m`` of each source is learned online from how high the source scores
the place the belief predicted (before it saw the frame), capped by ``max_signal``: a
source that carries no information on this map drifts to ``m = 0`` and stops counting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vpr_ros.config import Conf, option
from vpr_ros.sequence import KeyframeOrder, KeyframeSteps

LOG = logging.getLogger(__name__)


def logsumexp(values: np.ndarray) -> float:
    """log(sum(exp(values))) without overflow (numpy only: scipy is slow to import)."""
    peak = float(np.max(values))
    if not math.isfinite(peak):
        return peak
    return peak + math.log(float(np.sum(np.exp(values - peak))))


GLOBAL_SOURCE = 'global'
PATCH_SOURCE = 'patch'
RERANK_SOURCE = 'rerank'
FILTER_SOURCES = (GLOBAL_SOURCE, PATCH_SOURCE, RERANK_SOURCE)


@dataclass(frozen=True)
class FilterConf(Conf):
    """Settings of the place filter (``mode: filter``); see ``vpr_ros.place_filter``."""

    sources: list[str] = option(
        list(FILTER_SOURCES),
        "Evidence fused per frame: 'global' (model descriptor), 'patch' (patch-normalised "
        "pixels, where the map stores them), 'rerank' (re-ranking scores of the best "
        'rerank_k candidates)',
        choices=FILTER_SOURCES,
    )
    global_weight: float = option(
        1.0,
        "Most the 'global' source can count per frame (its learned signal m is capped here)",
        unit='z units',
        min=0.0,
    )
    patch_weight: float = option(
        0.25,
        "Most the 'patch' source can count per frame (its learned signal m is capped here)",
        unit='z units',
        min=0.0,
    )
    rerank_weight: float = option(
        1.0,
        "Most the 'rerank' source can count per frame (its learned signal m is capped here)",
        unit='z units',
        min=0.0,
    )
    keyframe_motion: str = option(
        'viterbi',
        "Without odometry, how the belief follows the keyframe order: 'viterbi' (each place "
        "keeps its most likely predecessor: sharper, as the sequence matcher) or 'marginal' "
        '(sums over all predecessors)',
        choices=('viterbi', 'marginal'),
    )
    signal_prior_frames: float = option(
        10.0,
        'Frames of evidence the learned signal needs to move away from max_signal',
        unit='frames',
        min=0.0,
    )
    contrast_window: int = option(
        5,
        'Keyframes each side over which a score is normalised (local contrast)',
        unit='keyframes',
        min=1,
    )
    normalisation: str = option(
        'local_mean',
        "How a source's distances become scores: 'local_mean' (less the keyframe "
        "neighbourhood's mean, over the map's spread), 'local_z' (SeqSLAM's local z-score), "
        "'global' (over the whole map)",
        choices=('local_mean', 'local_z', 'global'),
    )
    max_step: int = option(
        2, 'Without odometry: keyframes the belief may advance per frame', min=1
    )
    stop_penalty: float = option(
        4.0,
        'Without odometry: log-odds against staying when the image changed by a keyframe step',
        min=0.0,
    )
    skip_penalty: float = option(
        2.0,
        'Without odometry: log-odds against each keyframe skipped or advanced without change',
        min=0.0,
    )
    odom_sigma_m: float = option(
        1.0, 'With odometry: spread of the motion at rest', unit='m', min=0.0, min_exclusive=True
    )
    odom_sigma_per_m: float = option(
        0.2, 'With odometry: spread added per metre travelled', unit='m/m', min=0.0
    )
    odom_timeout_s: float = option(
        1.0,
        'Odometry older than this at a frame counts as a gap (no-odometry motion)',
        unit='s',
        min=0.0,
        min_exclusive=True,
    )
    switch_probability: float = option(
        0.001,
        'Per frame, belief exchanged between the tracking and the relocalizing model',
        min=0.0,
        max=0.5,
        min_exclusive=True,
    )
    off_map_prior: float = option(
        0.5,
        'Probability of being off the map before any evidence (relocalizing model)',
        min=0.0,
        max=0.99,
        min_exclusive=True,
    )
    exclusion_window: int = option(
        3,
        'Keyframes each side of a place counted with it for confidence, where places have '
        'no position',
        unit='keyframes',
        min=0,
    )


@dataclass
class FilterState:
    """What the filter believes after a frame (places in the map's order)."""

    posterior: np.ndarray  # (N,) place probabilities (they sum to 1 - off_map)
    off_map: float
    tracking_weight: float
    signals: dict[str, float]
    used_odometry: bool


class PlaceFilter:
    """The belief over a map's places and off-map, updated frame by frame.

    Args:
        descriptors: per source ('global', 'patch'), the map's (N, D) L2-normalised
            descriptors; the first one's keyframe steps drive the no-odometry motion.
        traverse_ids: (N,) traverse of each place; places of one traverse in keyframe order.
        place_xyz: (N, 3) place positions in metres (NaN: unknown), or None.
        conf: settings.
        competitor_radius_m: places within this of the best count towards its confidence.

    Raises:
        ValueError: no places, no descriptor source, or arrays of the wrong shape.
    """

    def __init__(
        self,
        descriptors: Mapping[str, np.ndarray],
        traverse_ids: np.ndarray,
        place_xyz: np.ndarray | None,
        conf: FilterConf | None = None,
        *,
        competitor_radius_m: float = 10.0,
    ) -> None:
        conf = conf or FilterConf()
        self.conf = conf
        if not descriptors:
            raise ValueError('the place filter needs at least one descriptor source')
        self.competitor_radius_m = competitor_radius_m
        traverse_ids = np.asarray(traverse_ids).reshape(-1)
        num_places = len(traverse_ids)
        if num_places == 0:
            raise ValueError('the place filter needs a map with at least one place')
        self.num_places = num_places
        # Work in an order where each traverse is contiguous and in keyframe order.
        layout = KeyframeOrder.of(traverse_ids)
        order = layout.order
        self._order = order
        self._rank = np.empty(num_places, np.int64)
        self._rank[order] = np.arange(num_places)
        sorted_traverse = traverse_ids[order]
        new_traverse = layout.new_traverse
        self._contrast_lo, self._contrast_hi = layout.windows(conf.contrast_window)
        self._exclusion_lo, self._exclusion_hi = layout.windows(conf.exclusion_window)
        starts = np.flatnonzero(new_traverse)
        ends = np.r_[starts[1:], num_places]
        self._segments = list(zip(starts.tolist(), ends.tolist(), strict=True))
        # Shifting by k stays inside a traverse where the traverse k places back is the same.
        self._same_traverse = {
            k: sorted_traverse[k:] == sorted_traverse[:-k] for k in range(1, conf.max_step + 1)
        }

        # Map descriptors per source, in the map's order (not copied when already float32;
        # each frame's similarities are reordered instead: N numbers, not N x D).
        self._descriptors: dict[str, np.ndarray] = {}
        for source, values in descriptors.items():
            values = np.asarray(values, np.float32)
            if values.ndim != 2 or len(values) != num_places:
                msg = f'{source} descriptors must be (N={num_places}, D), got {values.shape!r}'
                raise ValueError(msg)
            self._descriptors[source] = values
        self.step_source = next(iter(self._descriptors))
        # Keyframe steps in descriptor space (no-odometry motion), as the sequence matcher.
        steps = KeyframeSteps.of(self._descriptors[self.step_source], layout)
        self.reference_step = steps.reference
        self._half_step_in = steps.half_step_in
        self._inverse_step_out = steps.inverse_step_out

        # Positions and arc length along each traverse (odometry motion, confidence).
        self._xyz: np.ndarray | None = None
        self._arc: np.ndarray | None = None
        self.place_spacing_m = 1.0
        if place_xyz is not None:
            xyz = np.asarray(place_xyz, np.float64)[order]
            if np.all(np.isfinite(xyz)):
                self._xyz = xyz
                hops = np.linalg.norm(np.diff(xyz, axis=0), axis=1)
                hops[new_traverse[1:]] = 0.0
                arc = np.r_[0.0, np.cumsum(hops)]
                self._arc = arc - arc[layout.first]
                moving = hops[hops > 1e-3]
                self.place_spacing_m = float(np.median(moving)) if len(moving) else 1.0
        self.reset()

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: uniform over places and off-map at its prior."""
        self._tracking = self._prior_log()
        self._relocalizing = self._prior_log()
        self._tracking_weight = 0.5
        self._signal_sum: dict[str, float] = {}
        self._signal_weight: dict[str, float] = {}
        self._previous_odometry: np.ndarray | None = None
        self._previous_stamp: float | None = None
        self._previous_step_descriptor: np.ndarray | None = None
        self._warned: set[str] = set()
        self.state: FilterState | None = None

    def _prior_log(self) -> np.ndarray:
        """Log belief with no evidence: off-map at its prior, places uniform (sorted order)."""
        prior = np.full(
            self.num_places + 1, math.log((1 - self.conf.off_map_prior) / self.num_places)
        )
        prior[-1] = math.log(self.conf.off_map_prior)
        return prior

    def cap(self, source: str) -> float:
        """The most a source can count per frame (its ``<source>_weight``)."""
        caps = {
            GLOBAL_SOURCE: self.conf.global_weight,
            PATCH_SOURCE: self.conf.patch_weight,
            RERANK_SOURCE: self.conf.rerank_weight,
        }
        return caps[source]

    def signal(self, source: str) -> float:
        """The learned signal ``m`` of a source (its cap before any evidence)."""
        prior_frames = self.conf.signal_prior_frames
        cap = self.cap(source)
        total = self._signal_sum.get(source, 0.0) + prior_frames * cap
        weight = self._signal_weight.get(source, 0.0) + prior_frames
        if weight <= 0:
            return cap
        return float(np.clip(total / weight, 0.0, cap))

    # -- one frame -------------------------------------------------------------------------

    def update(
        self,
        queries: Mapping[str, np.ndarray],
        *,
        rerank: tuple[np.ndarray, np.ndarray] | None = None,
        odometry_xyz: np.ndarray | None = None,
        stamp: float | None = None,
        move: bool = True,
        allowed: np.ndarray | None = None,
    ) -> FilterState:
        """Move the belief and weigh it by one frame's evidence.

        Args:
            queries: per source, the frame's (D,) descriptor (sources the map lacks are
                ignored); the step source's change since the last frame drives the
                no-odometry motion.
            rerank: the re-ranked candidates (place indices) and their scores, or None.
            odometry_xyz: the robot's odometry position at the frame (any fixed frame);
                None: no odometry for this frame.
            stamp: the frame's time (s); the belief is not moved for an older frame.
            move: False applies the evidence without motion (e.g. a second camera).
            allowed: (N,) bool, map order: only these places can be the answer (a position
                prior: a GPS fix, a localizer's pose); None: all.
        """
        used_odometry, weight = False, 1.0
        if move:
            step_query = queries.get(self.step_source)
            if step_query is not None:
                step_query = np.asarray(step_query, np.float64).reshape(-1)
                step_query = step_query / max(float(np.linalg.norm(step_query)), 1e-12)
            used_odometry, weight = self._predict(step_query, odometry_xyz, stamp)
        scores: dict[str, np.ndarray] = {}
        for source, query in queries.items():
            if source not in self._descriptors:
                continue
            if source in self.conf.sources:
                scores[source] = self.source_scores(self.similarity(source, query))
        if rerank is not None and RERANK_SOURCE in self.conf.sources:
            rerank_scores = self.candidate_scores(*rerank)
            if rerank_scores is not None:
                scores[RERANK_SOURCE] = rerank_scores
        likelihood = np.zeros(self.num_places + 1)
        predicted = self._predicted_places()
        for source, u in scores.items():
            known = np.isfinite(u)
            self._learn_signal(source, u, known, predicted)
            m = self.signal(source)
            # Re-ranking scores only the candidates: the rest is neither for nor against.
            likelihood[:-1][known] += m * u[known] - 0.5 * m * m
        likelihood *= weight
        if allowed is not None:
            # Outside the prior: as good as impossible, whatever the images say.
            likelihood[:-1][~np.asarray(allowed, bool)[self._order]] = -1e3
        self._weigh(likelihood)
        self.state = self._state(used_odometry)
        return self.state

    def similarity(self, source: str, query: np.ndarray) -> np.ndarray:
        """Cosine similarity of a query descriptor to every place (sorted order)."""
        query = np.asarray(query, np.float32).reshape(-1)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        similarity: np.ndarray = (self._descriptors[source] @ query)[self._order]
        return similarity

    def source_scores(self, similarity: np.ndarray) -> np.ndarray:
        """Scores ``u`` of every place (sorted order) from a query's similarities.

        The query's distance to each place, less its mean over the place's keyframe
        neighbourhood (local contrast: a place must stand out from its neighbours, as in
        SeqSLAM), in units of the spread over the whole map. Dividing by each
        neighbourhood's own spread instead would reward places in flat neighbourhoods.
        """
        distance = np.sqrt(np.maximum(2.0 - 2.0 * similarity.astype(np.float64), 0.0))
        normalisation = self.conf.normalisation
        if normalisation == 'local_z':
            from vpr_ros.sequence import local_zscore

            return -local_zscore(distance, self._contrast_lo, self._contrast_hi).astype(np.float64)
        spread = max(float(distance.std()), 1e-9)
        if normalisation == 'global':
            global_scores: np.ndarray = -(distance - distance.mean()) / spread
            return global_scores
        cumulative = np.concatenate(([0.0], np.cumsum(distance)))
        count = self._contrast_hi - self._contrast_lo
        local_mean = (cumulative[self._contrast_hi] - cumulative[self._contrast_lo]) / count
        scores: np.ndarray = -(distance - local_mean) / spread
        return scores

    def candidate_scores(self, places: np.ndarray, values: np.ndarray) -> np.ndarray | None:
        """Scores ``u`` (sorted order, NaN elsewhere) of re-ranked candidates: their z-score
        among themselves; None when fewer than three differ."""
        places = np.asarray(places, np.int64).reshape(-1)
        values = np.asarray(values, np.float64).reshape(-1)[: len(places)]
        places = places[: len(values)]
        finite = np.isfinite(values)
        places, values = places[finite], values[finite]
        if len(values) < 3 or float(values.std()) <= 1e-9:
            return None
        out = np.full(self.num_places, np.nan)
        out[self._rank[places]] = (values - values.mean()) / values.std()
        return out

    def _predict(
        self,
        step_descriptor: np.ndarray | None,
        odometry_xyz: np.ndarray | None,
        stamp: float | None,
    ) -> tuple[bool, float]:
        """Mix the two models, then move the tracking one.

        Returns:
            Whether odometry moved it, and the frame's weight: how far the robot moved in
            keyframe steps, at most 1 (a robot at rest sees the same image again, which is
            not new evidence).
        """
        conf = self.conf
        if stamp is not None and self._previous_stamp is not None and stamp < self._previous_stamp:
            self._warn_once(
                'order', 'frames arrive out of order: not moving the belief for an older frame'
            )
            return False, 0.0
        if stamp is not None:
            self._previous_stamp = stamp
        # Interacting multiple models: each model starts from a mix of both posteriors.
        alpha = conf.switch_probability
        w_track = self._tracking_weight
        mix_track = (1 - alpha) * w_track
        mix_reloc = alpha * (1 - w_track)
        to_tracking = np.logaddexp(
            math.log(max(mix_track, 1e-300)) + self._tracking,
            math.log(max(mix_reloc, 1e-300)) + self._relocalizing,
        )
        self._tracking_weight = mix_track + mix_reloc
        to_tracking -= logsumexp(to_tracking)

        moved: np.ndarray | None = None
        used_odometry = False
        weight = 1.0
        if odometry_xyz is not None and self._arc is not None:
            odometry = np.asarray(odometry_xyz, np.float64).reshape(-1)[:3]
            if not np.all(np.isfinite(odometry)):
                self.note_odometry_gap()
            else:
                if self._previous_odometry is not None:
                    distance = float(np.linalg.norm(odometry - self._previous_odometry))
                    moved = self._move_by_distance(to_tracking, distance)
                    weight = min(distance / self.place_spacing_m, 1.0)
                    used_odometry = True
                self._previous_odometry = odometry
        elif odometry_xyz is not None:
            self._warn_once(
                'positions', 'the map has places without positions: odometry is not used'
            )
        else:
            self.note_odometry_gap()  # no odometry for this frame (warns if there was some)
        if moved is None:
            if step_descriptor is None or self._previous_step_descriptor is None:
                step = self.reference_step  # unknown change: as if it moved one keyframe
            else:
                step = float(np.linalg.norm(step_descriptor - self._previous_step_descriptor))
            moved = self._move_by_keyframe_steps(to_tracking, step)
            weight = min(step / self.reference_step, 1.0)
        if step_descriptor is not None:
            self._previous_step_descriptor = step_descriptor
        self._tracking = moved
        # The relocalizing model knows nothing of the past: its prior is flat each frame.
        self._relocalizing = self._prior_log()
        return used_odometry, weight

    def note_odometry_gap(self) -> None:
        """The next frame has no usable odometry: forget the last position, warn once."""
        if self._previous_odometry is not None:
            self._warn_once(
                'gap', 'odometry gap: the filter moves by keyframe order until odometry returns'
            )
        self._previous_odometry = None

    def _move_by_keyframe_steps(self, log_belief: np.ndarray, step: float) -> np.ndarray:
        """The sequence matcher's step prior as log transition weights (no odometry): the
        query's descriptor moved ``step`` since the last frame."""
        conf = self.conf
        places, off = log_belief[:-1], log_belief[-1]
        stay = places - conf.stop_penalty * np.minimum(step * self._inverse_step_out, 1.0)
        short = np.zeros(self.num_places)
        if 2.0 * step < self.reference_step:
            short = np.maximum(self._half_step_in - step, 0.0) * conf.skip_penalty
            short /= 0.5 * self.reference_step
        candidates = [stay]
        for k in range(1, conf.max_step + 1):
            shifted = np.full(self.num_places, -np.inf)
            if k < self.num_places:
                from_back = places[:-k] - short[k:] - conf.skip_penalty * (k - 1)
                shifted[k:] = np.where(self._same_traverse[k], from_back, -np.inf)
            candidates.append(shifted)
        stacked = np.stack(candidates)
        if conf.keyframe_motion == 'viterbi':
            moved = stacked.max(axis=0)
        else:
            moved = np.logaddexp.reduce(stacked, axis=0)
        # Mass that cannot move (end of a traverse) stays where it is.
        moved = np.where(np.isfinite(moved), moved, places)
        out: np.ndarray = np.r_[moved, off]
        return out - logsumexp(out)

    def _move_by_distance(self, log_belief: np.ndarray, distance: float) -> np.ndarray:
        """Move along each traverse by ``distance`` metres, spread by the odometry noise."""
        assert self._arc is not None
        conf = self.conf
        sigma = conf.odom_sigma_m + conf.odom_sigma_per_m * distance
        peak = log_belief.max()
        belief = np.exp(log_belief - peak)
        places, off = belief[:-1], belief[-1]
        moved = np.zeros(self.num_places)
        for start, end in self._segments:
            arc = self._arc[start:end]
            mass = places[start:end]
            count = end - start
            if count == 1:
                moved[start] += mass[0]
                continue
            # Each place's mass lands at arc + distance (a fractional place index; mass
            # driven past the end of its traverse stays at the last place) ...
            target = np.interp(arc + distance, arc, np.arange(count, dtype=np.float64))
            low = np.floor(target).astype(np.int64)
            high = np.minimum(low + 1, count - 1)
            fraction = target - low
            landed = np.bincount(low, mass * (1.0 - fraction), count)
            landed += np.bincount(high, mass * fraction, count)
            # ... spread by the odometry noise: a Gaussian over place indices (O(N K)).
            hops = np.diff(arc)
            spacing = float(np.median(hops[hops > 1e-3])) if np.any(hops > 1e-3) else 1.0
            sigma_places = sigma / spacing
            if sigma_places > 0.25:
                reach = min(int(math.ceil(4.0 * sigma_places)), count - 1)
                offsets = np.arange(-reach, reach + 1, dtype=np.float64)
                kernel = np.exp(-0.5 * (offsets / sigma_places) ** 2)
                landed = np.convolve(landed, kernel / kernel.sum(), mode='same')
            moved[start:end] = landed
        out = np.r_[moved, off]
        with np.errstate(divide='ignore'):
            log_out: np.ndarray = np.log(out) + peak
        return log_out - logsumexp(log_out)

    def _predicted_places(self) -> np.ndarray:
        """Where the combined belief expects the robot before this frame (sorted order)."""
        w = self._tracking_weight
        combined = np.logaddexp(
            math.log(max(w, 1e-300)) + self._tracking,
            math.log(max(1 - w, 1e-300)) + self._relocalizing,
        )
        places = np.exp(combined[:-1] - logsumexp(combined[:-1]))
        return places

    def _learn_signal(
        self, source: str, u: np.ndarray, known: np.ndarray, predicted: np.ndarray
    ) -> None:
        """Update a source's signal from its score at the predicted place.

        Weighted by how sure the prediction is (1 - normalised entropy), so a flat belief
        teaches nothing and a source cannot learn from its own current frame.
        """
        mass = predicted * known
        total = mass.sum()
        if total <= 1e-12:
            return
        mass /= total
        entropy = -float(np.sum(mass[mass > 0] * np.log(mass[mass > 0])))
        certainty = 1.0 - entropy / math.log(max(int(known.sum()), 2))
        if certainty <= 0:
            return
        expected = float(np.sum(mass[known] * u[known]))
        self._signal_sum[source] = self._signal_sum.get(source, 0.0) + certainty * expected
        self._signal_weight[source] = self._signal_weight.get(source, 0.0) + certainty

    def _weigh(self, log_likelihood: np.ndarray) -> None:
        """Bayes' rule in both models; the models' weights follow their evidence."""
        tracking = self._tracking + log_likelihood
        relocalizing = self._relocalizing + log_likelihood
        evidence_tracking = logsumexp(tracking)
        evidence_relocalizing = logsumexp(relocalizing)
        w = self._tracking_weight
        log_w = np.array(
            [
                math.log(max(w, 1e-300)) + evidence_tracking,
                math.log(max(1 - w, 1e-300)) + evidence_relocalizing,
            ]
        )
        log_w -= logsumexp(log_w)
        self._tracking_weight = float(np.exp(log_w[0]))
        self._tracking = tracking - evidence_tracking
        self._relocalizing = relocalizing - evidence_relocalizing

    def _state(self, used_odometry: bool) -> FilterState:
        w = self._tracking_weight
        combined = np.logaddexp(
            math.log(max(w, 1e-300)) + self._tracking,
            math.log(max(1 - w, 1e-300)) + self._relocalizing,
        )
        belief = np.exp(combined - logsumexp(combined))
        posterior = np.empty(self.num_places)
        posterior[self._order] = belief[:-1]
        signals = {source: self.signal(source) for source in self._signal_weight}
        return FilterState(posterior, float(belief[-1]), w, signals, used_odometry)

    # -- answers ---------------------------------------------------------------------------

    def region(self, place: int) -> np.ndarray:
        """Mask (map order) of the places that count with ``place`` for its confidence."""
        mask = np.zeros(self.num_places, bool)
        rank = self._rank[place]
        lo, hi = self._exclusion_lo[rank], self._exclusion_hi[rank]
        mask[self._order[lo:hi]] = True
        if self._xyz is not None:
            distance = np.linalg.norm(self._xyz - self._xyz[rank], axis=1)
            near = np.zeros(self.num_places, bool)
            near[self._order] = distance <= self.competitor_radius_m
            mask |= near
        return mask

    def best_places(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` places, best first, one per region, with their confidences.

        A place's confidence is the posterior mass of its region: the probability that the
        robot is there (within ``competitor_radius_m``).
        """
        assert self.state is not None, 'update first'
        remaining = self.state.posterior.copy()
        places: list[int] = []
        confidence: list[float] = []
        for _ in range(min(count, self.num_places)):
            place = int(np.argmax(remaining))
            if remaining[place] <= 1e-12 and places:  # nothing the belief allows is left
                break
            region = self.region(place)
            places.append(place)
            confidence.append(float(self.state.posterior[region].sum()))
            remaining[region] = -1.0
        return np.array(places, np.int64), np.clip(np.array(confidence), 0.0, 1.0)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            LOG.warning(message)
