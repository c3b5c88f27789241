"""``mnn_ransac``: MNN local matches verified by RANSAC on the local-feature grid.

The seed's two-stage baseline: the same mutual-nearest-neighbour matches as ``mnn``, then
OpenCV's USAC MAGSAC fits a homography (or fundamental matrix) to the matched cells' grid
coordinates; the score is the fraction of the query's locations that are inliers. It needs
the map's local features and the grid they lie on (``PlaceDatabase.local_grid``).
Positions are grid cells, not pixels, so no relative pose is estimated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.rerankers.base import Reranked
from vpr_ros.rerankers.mnn import mnn_matches_batch, stored_local_features
from vpr_ros.rerankers.verification import VerificationConf, ransac_inliers

if TYPE_CHECKING:
    from vpr_ros.database import PlaceDatabase
    from vpr_ros.extraction import Descriptors
    from vpr_ros.types import CameraIntrinsics


def grid_coordinates(grid: tuple[int, int]) -> np.ndarray:
    """(h * w, 2) float32 (x, y) centres of the cells of a row-major ``grid`` (h, w)."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    return np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float32)


class MnnRansacReranker:
    """MNN matches on the local-feature grid, scored by RANSAC inliers / query locations.

    Args:
        database: the map (local features on a known grid).
        min_similarity: MNN matches below this cosine similarity are dropped.
        verification: RANSAC settings (``ransac_model``, ``grid_threshold_cells``, ...).
    """

    name: ClassVar[str] = 'mnn_ransac'
    store: ClassVar[str | None] = None
    needs_image: ClassVar[bool] = False

    def __init__(
        self,
        database: PlaceDatabase,
        *,
        min_similarity: float = -1.0,
        verification: VerificationConf | None = None,
    ) -> None:
        assert database.local_grid is not None  # check_map
        self.database = database
        self.min_similarity = float(min_similarity)
        self.verification = verification or VerificationConf()
        self.grid: tuple[int, int] = (int(database.local_grid[0]), int(database.local_grid[1]))
        self._cells = grid_coordinates(self.grid)

    @classmethod
    def check_map(cls, database: PlaceDatabase) -> None:
        if database.local_features is None:
            msg = (
                f"re-ranker {cls.name!r} needs the map's local features, and this map has none "
                '(built with --no-local-features); rebuild it with local features'
            )
            raise DatabaseError(msg)
        grid = database.local_grid
        if not grid or int(grid[0]) * int(grid[1]) != database.local_features.shape[1]:
            msg = (
                f"re-ranker {cls.name!r} needs the grid of the map's local features "
                f'(manifest local.grid), and this map records {grid!r}; rebuild the map with '
                'this version of build_map'
            )
            raise DatabaseError(msg)

    def query_features(
        self,
        image: np.ndarray | None,
        descriptors: Descriptors,
        camera: CameraIntrinsics | None = None,
    ) -> np.ndarray:
        grid = descriptors.local_grid
        if grid is not None and tuple(grid) != self.grid:
            msg = (
                f"the query's local features lie on a {tuple(grid)!r} grid, the map's on "
                f'{self.grid!r}; query with the image size the map was built with'
            )
            raise ConfigError(msg)
        local: np.ndarray = descriptors.local_features[0]
        return local

    def rerank(self, query: np.ndarray, candidates: np.ndarray) -> Reranked:
        stored = stored_local_features(self.database, candidates)
        matched, nearest = mnn_matches_batch(query, stored, self.min_similarity)
        conf = self.verification
        inliers = np.zeros(len(candidates), np.int64)
        for k in range(len(candidates)):
            rows = np.flatnonzero(matched[k])
            verified = ransac_inliers(
                self._cells[rows],
                self._cells[nearest[k, rows]],
                model=conf.ransac_model,
                threshold=conf.grid_threshold_cells,
                iterations=conf.ransac_iterations,
                confidence=conf.ransac_confidence,
            )
            inliers[k] = int(verified.sum())
        scores = (inliers / max(1, len(query))).astype(np.float32)
        return Reranked(scores, inliers)
