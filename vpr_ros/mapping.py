"""Building a place database from frames: keyframes -> descriptors -> map.

``build_map`` is the core of the ``build_map`` command; the live map-builder node uses
``MapBuilder`` directly, frame by frame.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.bagio import NO_POSE_REASON, count_messages, read_frames
from vpr_ros.config import Conf, nested, option
from vpr_ros.database import (
    PlaceDatabase,
    check_map_target,
    map_files,
    map_lock,
    place_records,
)
from vpr_ros.errors import BagReadError, ConfigError, DatabaseError
from vpr_ros.images import DEFAULT_MAX_PIXELS, TOO_LARGE_REASON
from vpr_ros.keyframes import KeyframeConf, KeyframeSelector
from vpr_ros.models.preprocessing import resize_to
from vpr_ros.rerankers import RERANKERS, STORED_VERIFIERS
from vpr_ros.rerankers.keypoints import keypoint_model
from vpr_ros.retrieval import IndexConf
from vpr_ros.sequence import SequenceConf, patch_normalised_descriptor
from vpr_ros.types import Frame, SkipCounter

if TYPE_CHECKING:
    from vpr_ros.extraction import Descriptors, Extractor
    from vpr_ros.models.base import VprModel


@dataclass(frozen=True)
class BuildConf(Conf):
    """How a map is built from frames (build_map's options, map_builder's parameters)."""

    keyframes: KeyframeConf = nested(KeyframeConf, flatten=True)
    max_pose_gap_s: float = option(
        0.5,
        'Skip images whose two bracketing poses are further apart than this',
        unit='s',
        min=0.0,
        min_exclusive=True,
    )
    batch_size: int = option(8, 'Images per forward pass', min=1)
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        'Frames with more pixels (width * height, read from the header before decoding) '
        'are refused and counted',
        unit='px',
        min=1,
    )
    local_features: bool = option(
        True, 'Store local features (needed for re-ranking; about L * C * 2 bytes a place)'
    )
    sequence_descriptors: bool = option(
        True,
        'Store patch-normalised pixels per place for sequence matching (about 4 KB a place '
        'at 64x32; without them sequence matching needs its global-descriptor variant)',
    )
    sequence_image_size: list[int] = option(
        [64, 32],
        'Sequence descriptors: (width, height) images are resized to',
        unit='px',
        min=1,
        length=2,
        cli=False,
    )
    sequence_patch: int = option(
        8, 'Sequence descriptors: side of the normalised patches', unit='px', min=1, cli=False
    )
    verifiers: str = option(
        '',
        'Keypoint verifiers the map serves, comma-separated (empty: none); each stores its '
        'keypoints (float32 pixels) and float16 descriptors per place: xfeat_lighterglue '
        '12 + 136 N bytes a place, aliked_lightglue 12 + 264 N (N = verifier_keypoints); '
        f'one or more of {", ".join(STORED_VERIFIERS)}',
    )
    verifier_keypoints: int = option(
        512, 'Verifiers: keypoints stored per place (N), strongest first', min=1
    )
    verifier_image_side: int = option(
        640,
        'Verifiers: images whose longer side exceeds this are shrunk to it before keypoint '
        'extraction (keypoints are stored in original pixels)',
        unit='px',
        min=32,
    )
    index: IndexConf = nested(IndexConf)

    def validate(self) -> None:
        self.verifier_names()

    def verifier_names(self) -> list[str]:
        """The verifiers of ``verifiers``, in the given order, without repeats."""
        names = [n.strip() for n in self.verifiers.split(',') if n.strip()]
        unknown = [n for n in names if n not in STORED_VERIFIERS]
        if unknown:
            msg = (
                f'verifiers names {unknown!r}, which store nothing or do not exist; known: '
                f'{list(STORED_VERIFIERS)!r} (mnn and mnn_ransac use the local features)'
            )
            raise ConfigError(msg)
        return list(dict.fromkeys(names))

    def feature_stores(self) -> dict[str, dict[str, Any]]:
        """The feature stores the verifiers read: store name -> its settings."""
        return {
            RERANKERS[name].store: {
                'extractor': RERANKERS[name].store,
                'max_keypoints': self.verifier_keypoints,
                'max_image_side': self.verifier_image_side,
            }
            for name in self.verifier_names()
        }

    def sequence_settings(self) -> dict[str, Any] | None:
        """What the map records of how its sequence descriptors are made (None: none)."""
        if not self.sequence_descriptors:
            return None
        SequenceConf(image_size=self.sequence_image_size, patch=self.sequence_patch)  # check
        return {'image_size': list(self.sequence_image_size), 'patch': self.sequence_patch}


@dataclass
class BuildSummary:
    """What a map build read, kept and skipped."""

    messages_read: int = 0
    keyframes: int = 0
    not_keyframes: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)
    places_in_map: int = 0
    map_bytes: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.messages_read / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        return '\n'.join(
            [
                f'messages read:      {self.messages_read}',
                f'keyframes kept:     {self.keyframes}',
                f'not keyframes:      {self.not_keyframes} (too close to the previous keyframe)',
                f'frames skipped:     {self.skipped.total} ({self.skipped.summary()})',
                f'frames refused:     {self.skipped.counts.get(TOO_LARGE_REASON, 0)} '
                '(more pixels than --max-image-pixels)',
                f'places in map:      {self.places_in_map}',
                f'map size:           {self.map_bytes / 1e6:.2f} MB',
                f'speed:              {self.images_per_second:.1f} images/s '
                f'({self.seconds:.1f} s)',
            ]
        )


class MapBuilder:
    """Accumulates keyframes of one or more traverses into a ``PlaceDatabase``.

    Args:
        model: the descriptor model, or an extractor running it (``vpr_ros.extraction``;
            its batch size is its own).
        conf: the settings, or a mapping of overrides of the defaults.
        database: an existing map to append to (same model), or None for a new one.
        num_threads: threads for a model given as such (torch, faiss, BLAS).
    """

    def __init__(
        self,
        model: VprModel | Extractor,
        conf: BuildConf | Mapping[str, Any] | None = None,
        *,
        database: PlaceDatabase | None = None,
        num_threads: int | None = None,
    ) -> None:
        from vpr_ros.extraction import as_extractor

        self.conf = conf if isinstance(conf, BuildConf) else BuildConf.from_dict(conf)
        self.extractor = as_extractor(
            model, batch_size=self.conf.batch_size, num_threads=num_threads
        )
        identity = self.extractor.identity()
        if database is not None:
            database.check_model(identity, what='the model building on it')
            stores = database.feature_store_settings
            asked = self.conf.feature_stores()
            if asked and asked != stores:
                msg = (
                    f'the map has the feature stores {stores!r}, the settings ask for '
                    f'{asked!r}; an appended map keeps its own: rebuild it instead'
                )
                raise DatabaseError(msg)
        else:
            stores = self.conf.feature_stores()
        # The keypoint models of the map's feature stores (an appended map keeps its own).
        self.keypoint_models = {name: keypoint_model(s) for name, s in stores.items()}
        self.database = database or PlaceDatabase.empty(
            identity,
            with_local=self.conf.local_features,
            index_conf=self.conf.index,
            sequence_conf=self.conf.sequence_settings(),
            feature_stores={
                name: (keypoints.row_dtype(), keypoints.settings)
                for name, keypoints in self.keypoint_models.items()
            },
        )
        self.selector = KeyframeSelector.from_conf(self.conf.keyframes)
        self.traverse = self.database.next_traverse()
        # Keyframes waiting for a full batch, already shrunk to the model's input size
        # (with their sequence descriptors made from the full image), so a batch never
        # holds full-resolution frames.
        # (frame at the model input size, sequence descriptor, verifier store rows)
        self._pending: list[tuple[Frame, np.ndarray | None, dict[str, np.ndarray]]] = []

    def start_traverse(self) -> None:
        """Begin a new traverse (a new bag or recording): keyframe order restarts."""
        self.flush()
        if len(self.database) and (self.database.places['traverse'] == self.traverse).any():
            self.traverse += 1
        self.selector.reset()

    def offer(self, frame: Frame, descriptors: Descriptors | None = None) -> bool:
        """Consider one frame; returns whether it was kept as a keyframe.

        ``descriptors``: the frame's own (a batch of one), when it was described already
        (e.g. to query the map with it): a keyframe then joins the map at once, without a
        second forward pass. Otherwise keyframes wait for a full batch.
        """
        if not self.selector.accept(frame.stamp_ns, frame.pose):
            return False
        sequence = None
        if self.database.sequence_conf is not None:
            settings = self.database.sequence_conf
            sequence = patch_normalised_descriptor(
                [frame.image], tuple(settings['image_size']), int(settings['patch'])
            )[0]
        # Verifier keypoints come from the full image (their coordinates are its pixels);
        # the model only needs its input size, so the frame waits for its batch small.
        stores = {
            name: keypoints.extract_rows([frame.image])[0]
            for name, keypoints in self.keypoint_models.items()
        }
        if descriptors is not None:
            self.flush()
            self._add([(frame, sequence, stores)], descriptors)
            return True
        small = replace(frame, image=resize_to(frame.image, self.extractor.input_size))
        self._pending.append((small, sequence, stores))
        if len(self._pending) >= self.extractor.batch_size:
            self.flush()
        return True

    def flush(self) -> None:
        """Describe the pending keyframes and add them to the map."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._add(pending, self.extractor.extract([frame.image for frame, _, _ in pending]))

    def _add(
        self,
        keyframes: Sequence[tuple[Frame, np.ndarray | None, dict[str, np.ndarray]]],
        descriptors: Descriptors,
    ) -> None:
        """Add described keyframes (frame, sequence descriptor, verifier store rows)."""
        frames = [frame for frame, _, _ in keyframes]
        rows = place_records(
            frames, first_id=self.database.next_place_id(), traverse=self.traverse
        )
        local = descriptors.local_features if self.database.local_features is not None else None
        sequence = None
        if self.database.sequence_conf is not None:
            sequence = np.stack([s for _, s, _ in keyframes if s is not None])
        stores = {
            name: np.stack([rows_of[name] for _, _, rows_of in keyframes])
            for name in self.keypoint_models
        }
        self.database.add(
            descriptors.global_descriptors,
            rows,
            local,
            sequence,
            local_grid=descriptors.local_grid,
            feature_stores=stores,
        )

    def record_enu_origin(self, enu_origin: Sequence[float] | None) -> None:
        """Record the ENU origin of the map's NavSatFix poses (``None``: the poses are not
        from NavSatFix, nothing to record).

        The origin comes from the pose-track builder, which was given the map's own origin
        (``database.enu_origin``) when the map had one, so the two can only differ by mistake.

        Raises:
            DatabaseError: the map already has another origin.
        """
        if enu_origin is None:
            return
        current = self.database.enu_origin
        if current is not None and tuple(current) != tuple(enu_origin):
            msg = (
                f"the new poses are in the ENU frame at {enu_origin!r}, the map's at "
                f"{current!r}; give the pose reader the map's origin"
            )
            raise DatabaseError(msg)
        self.database.enu_origin = tuple(enu_origin)

    def save(self, path: str | os.PathLike) -> Path:
        self.flush()
        return self.database.save(path)


def build_map(
    model: VprModel | Extractor,
    bags: Sequence[str | os.PathLike],
    image_topic: str,
    pose_topic: str | None,
    out_dir: str | os.PathLike,
    *,
    conf: BuildConf | Mapping[str, Any] | None = None,
    append: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
    lock_timeout_s: float = 0.0,
) -> BuildSummary:
    """Build (or extend) the map at ``out_dir`` from bags; each bag is one traverse.

    Nothing is written unless every bag was read completely: a corrupt bag raises
    ``BagReadError`` and leaves ``out_dir`` as it was. ``out_dir`` is checked first (see
    ``database.check_map_target``), and its writer lock is held from reading the map
    (``append``) to saving it, so concurrent builds of one map cannot lose places; another
    writer makes this one wait up to ``lock_timeout_s``, then fail.
    """
    check_map_target(out_dir, what='--out')
    with map_lock(out_dir, timeout_s=lock_timeout_s):
        return _build_map(
            model, bags, image_topic, pose_topic, out_dir, conf, append, num_threads, progress
        )


def _build_map(
    model: VprModel | Extractor,
    bags: Sequence[str | os.PathLike],
    image_topic: str,
    pose_topic: str | None,
    out_dir: str | os.PathLike,
    conf: BuildConf | Mapping[str, Any] | None,
    append: bool,
    num_threads: int | None,
    progress: bool,
) -> BuildSummary:
    from vpr_ros.extraction import as_extractor

    start = time.perf_counter()
    database = None
    conf = conf if isinstance(conf, BuildConf) else BuildConf.from_dict(conf)
    extractor = as_extractor(model, batch_size=conf.batch_size, num_threads=num_threads)
    if append and PlaceDatabase.is_map(out_dir):
        database = PlaceDatabase.load(out_dir, expected_model=extractor.identity(), mmap=False)
        logger.info('appending to %r (%d places)', str(out_dir), len(database))
    builder = MapBuilder(extractor, conf, database=database)
    places_before = len(builder.database)
    summary = BuildSummary()
    bag_paths = [Path(bag) for bag in bags]
    total = count_messages(bag_paths, image_topic)
    frames_read = 0
    # All bags (and a map being extended) share one ENU frame for NavSatFix poses: the map's
    # origin, or else the first fix of the first bag, handed from bag to bag.
    enu_origin = builder.database.enu_origin
    with tqdm(total=total, unit='img', desc='build_map', disable=not progress) as bar:
        for bag in bag_paths:
            builder.start_traverse()
            frames = read_frames(
                [bag],
                image_topic,
                pose_topic,
                max_pose_gap_s=builder.conf.max_pose_gap_s,
                skips=summary.skipped,
                enu_origin=enu_origin,
                max_pixels=builder.conf.max_image_pixels,
            )
            for frame in frames:
                frames_read += 1
                if builder.offer(frame):
                    summary.keyframes += 1
                else:
                    summary.not_keyframes += 1
                bar.update(frames_read + summary.skipped.total - bar.n)
            enu_origin = frames.enu_origin
    # Skipped frames (no pose, undecodable) are messages read too.
    summary.messages_read = frames_read + summary.skipped.total
    builder.flush()
    builder.record_enu_origin(enu_origin)
    if len(builder.database) == places_before:
        msg = (
            f'no usable frames in {[str(b) for b in bags]!r} '
            f'({summary.messages_read} images, skipped: {summary.skipped.summary()}); '
            f'nothing written. {_no_frames_hint(summary.skipped.counts)}'
        )
        raise BagReadError(msg)
    path = builder.save(out_dir)
    summary.places_in_map = len(builder.database)
    summary.map_bytes = sum(f.stat().st_size for f in map_files(path))
    summary.seconds = time.perf_counter() - start
    return summary


def _no_frames_hint(skipped: Mapping[str, int]) -> str:
    """What to check when no frame was usable, by the commonest reason frames were skipped."""
    if not skipped:
        return 'The image topic has no messages'
    reason = max(skipped, key=lambda r: skipped[r])
    if reason == NO_POSE_REASON:
        return 'Check --pose-topic and --max-pose-gap-s'
    if reason == TOO_LARGE_REASON:
        return 'The images are larger than --max-image-pixels; raise it if they are genuine'
    return (
        f'The images could not be decoded ({reason}); republish them in a supported encoding '
        '(rgb8, bgr8, rgba8, bgra8, mono8, mono16, or jpeg/png compressed)'
    )
