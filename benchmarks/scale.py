"""How the map scales: bytes, load time, query latency, agreement and recall at 10k-1M places.

Descriptors that keep the statistics of real ones: the default model's global descriptors
of nordland64 summer frames (every ``--fit-stride``-th) fit a Gaussian (mean and the top
principal directions, plus isotropic noise with the remaining variance), sampled and
L2-normalised to fill the map. The real places are gardens_sfu_places (database: view i0 of
each place) inserted at random positions among them, and the real queries are its other
views, so the true matches are known; the generator never saw gardens_sfu_places.

For each size the map is built with the default index settings (``IndexConf.type`` 'auto':
flat up to 20k places, HNSW over 8-bit codes up to 200k, IVF-PQ beyond), saved and loaded
again, and this prints:

- bytes per place on disk (global descriptors, place rows, index; the default model's local
  features and sequence descriptors add a fixed 8,960 + 1,536 bytes, see --help) and the
  RSS the loaded map adds;
- load time (sizes and headers checked; chunk checksums verified later);
- query p50 / p99 (one query at a time, top 10, re-scored), over the real queries and
  synthetic ones;
- top-1 and top-10 agreement with exact search (all places, float32), real + synthetic
  queries;
- R@1 of the real queries in the large map (and in the map of the real places alone);
- append time: adding and saving ``--append`` places to the saved map.

``--milvus`` adds the same rows for the milvus engine on Milvus Lite at the sizes given.
Example (the machine is shared: compare rows of one run)::

    python benchmarks/scale.py --data ../shared/datasets --sizes 10000 100000 --milvus 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vpr_ros.database import PlaceDatabase, map_files, place_records
from vpr_ros.imagefolders import list_images, load_image
from vpr_ros.types import Frame, Pose

MB = 1e6


def rss_mb() -> float:
    with open('/proc/self/statm') as stream:
        return int(stream.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / MB


def describe(model, paths: list[Path], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    from vpr_ros.extraction import Extractor

    extractor = Extractor(model, batch_size=16)
    out = []
    for start in range(0, len(paths), 64):
        images = [load_image(p) for p in paths[start : start + 64]]
        out.append(extractor.extract(images).global_descriptors)
    descriptors = np.concatenate(out).astype(np.float32)
    np.save(cache, descriptors)
    return descriptors


class Generator:
    """Gaussian fitted to descriptors: mean, top ``rank`` principal directions, isotropic rest."""

    def __init__(self, fit: np.ndarray, rank: int, seed: int = 0) -> None:
        self.mean = fit.mean(axis=0)
        centred = fit - self.mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        rank = min(rank, len(singular) - 1)
        self.basis = vt[:rank]
        self.scales = singular[:rank] / np.sqrt(len(fit) - 1)
        rest = (singular[rank:] ** 2).sum() / (len(fit) - 1)
        self.noise = float(np.sqrt(rest / fit.shape[1]))
        self.rng = np.random.default_rng(seed)

    def sample(self, count: int) -> np.ndarray:
        coefficients = self.rng.standard_normal((count, len(self.scales))) * self.scales
        noise = self.rng.standard_normal((count, len(self.mean))) * self.noise
        out = (self.mean + coefficients @ self.basis + noise).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def rows(count: int, first_id: int = 0, traverse: int = 0) -> np.ndarray:
    frames = [
        Frame(np.zeros((1, 1, 3), np.uint8), 10**9 * (first_id + i), pose=Pose(float(i), 0.0, 0.0))
        for i in range(count)
    ]
    return place_records(frames, first_id=first_id, traverse=traverse)


def measure(
    size: int,
    generator: Generator,
    real_map: np.ndarray,
    real_queries: np.ndarray,
    query_places: np.ndarray,
    synthetic_queries: int,
    append: int,
    index: dict,
    workdir: Path,
) -> dict[str, float]:
    rng = np.random.default_rng(size)
    descriptors = np.zeros((size, real_map.shape[1]), np.float32)
    for start in range(0, size, 50_000):
        descriptors[start : start + 50_000] = generator.sample(min(50_000, size - start))
    where = np.sort(rng.choice(size, len(real_map), replace=False))
    descriptors[where] = real_map
    from vpr_ros.models import DEFAULT_MODEL, load_model

    identity = load_model(DEFAULT_MODEL).identity()
    path = workdir / f'map_{size}_{index.get("backend", "faiss")}'
    database = PlaceDatabase.empty(identity, with_local=False, index_conf=index)
    started = time.perf_counter()
    for start in range(0, size, 8192):  # as a build flushes keyframes
        stop = min(size, start + 8192)
        database.add(descriptors[start:stop], rows(stop - start, first_id=start))
    database.save(path)
    build_s = time.perf_counter() - started
    if hasattr(database.index, 'close'):
        database.index.close()
    del database
    disk = sum(f.stat().st_size for f in map_files(path))
    before = rss_mb()
    started = time.perf_counter()
    loaded = PlaceDatabase.load(path, verify_checksums=False)
    load_s = time.perf_counter() - started
    ram = rss_mb() - before
    synthetic = generator.sample(synthetic_queries)
    noisy = synthetic + 0.05 * generator.sample(synthetic_queries)  # near a map place
    queries = np.concatenate([real_queries, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    latencies, found = [], []
    for query in queries:
        begun = time.perf_counter()
        _, ids = loaded.search(query[None], 10)
        latencies.append(time.perf_counter() - begun)
        found.append(ids[0])
    found_ids = np.stack(found)
    # Agreement by similarity, not by id: gardens_sfu_places holds some views twice (pairs
    # and triplets share images), so equal descriptors tie.
    similarities = queries @ descriptors.T
    exact = np.sort(similarities, axis=1)[:, ::-1][:, :10]
    got = np.take_along_axis(similarities, np.maximum(found_ids, 0), axis=1)
    top1 = float((got[:, 0] >= exact[:, 0] - 1e-5).mean())
    top10 = float((got >= exact[:, 9:10] - 1e-5).mean())
    real_found = descriptors[found_ids[: len(real_queries), 0]]
    recall = float(np.isclose(real_found, real_map[query_places], atol=1e-6).all(axis=1).mean())
    started = time.perf_counter()
    more = generator.sample(append)
    loaded.add(more, rows(append, first_id=loaded.next_place_id(), traverse=1))
    loaded.save(path)
    append_s = time.perf_counter() - started
    if hasattr(loaded.index, 'close'):
        loaded.index.close()
    shutil.rmtree(path, ignore_errors=True)
    latency_ms = np.asarray(latencies) * 1000
    return {
        'places': size,
        'engine': index.get('backend', 'faiss'),
        'index': loaded.index.state().get('type', '?'),
        'disk_bytes_per_place': disk / size,
        'ram_mb': ram,
        'build_s': build_s,
        'load_s': load_s,
        'p50_ms': float(np.percentile(latency_ms, 50)),
        'p99_ms': float(np.percentile(latency_ms, 99)),
        'top1_agreement': top1,
        'top10_agreement': top10,
        'real_r1': recall,
        'append_s': append_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', type=Path, default=Path('../shared/datasets'))
    parser.add_argument('--sizes', type=int, nargs='+', default=[10_000, 100_000])
    parser.add_argument('--milvus', type=int, nargs='*', default=[], help='sizes for Milvus Lite')
    parser.add_argument('--fit-stride', type=int, default=4, help='nordland frames to fit on')
    parser.add_argument('--rank', type=int, default=256, help='principal directions fitted')
    parser.add_argument('--queries', type=int, default=200, help='synthetic queries')
    parser.add_argument('--append', type=int, default=1000, help='places appended')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--cache', type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    from vpr_ros.models import DEFAULT_MODEL, load_model
    from vpr_ros.runtime import set_num_threads

    set_num_threads(args.threads)
    model = load_model(DEFAULT_MODEL)
    summer = list_images(args.data / 'nordland64' / 'summer')[:: args.fit_stride]
    fit = describe(model, summer, args.cache / f'scale_nordland_{args.fit_stride}.npy')
    gardens = args.data / 'gardens_sfu_places'
    map_paths, query_paths, query_places = [], [], []
    for group in ('pairs', 'triplets'):
        for place in sorted(p for p in (gardens / group).iterdir() if p.is_dir()):
            views = sorted(place.iterdir())
            map_paths.append(list_images(views[0])[0])
            for view in views[1:]:
                query_paths.append(list_images(view)[0])
                query_places.append(len(map_paths) - 1)
    real_map = describe(model, map_paths, args.cache / 'scale_gardens_map.npy')
    real_queries = describe(model, query_paths, args.cache / 'scale_gardens_queries.npy')
    places = np.asarray(query_places)
    best = real_map[np.argmax(real_queries @ real_map.T, axis=1)]
    alone = float(np.isclose(best, real_map[places], atol=1e-6).all(axis=1).mean())
    generator = Generator(fit, args.rank)
    print(
        f'fitted on {len(fit)} nordland64 summer descriptors (rank {args.rank}); real: '
        f'{len(real_map)} gardens_sfu_places places, {len(real_queries)} queries, '
        f'R@1 in their own map {alone:.3f}; {args.threads} threads, shared machine'
    )
    header = (
        f'{"engine":>7} {"places":>8} {"index":>6} {"disk B/place":>12} {"RAM MB":>7} '
        f'{"build s":>8} {"load s":>7} {"p50 ms":>7} {"p99 ms":>7} {"top1":>5} {"top10":>6} '
        f'{"R@1":>5} {"append s":>8}'
    )
    print(header)
    runs = [(size, {}) for size in args.sizes]
    runs += [(size, {'backend': 'milvus'}) for size in args.milvus]
    with tempfile.TemporaryDirectory() as tmp:
        for size, index in runs:
            row = measure(size, generator, real_map, real_queries, places, args.queries,
                          args.append, index, Path(tmp))  # fmt: skip
            print(
                f'{row["engine"]:>7} {row["places"]:>8} {row["index"]:>6} '
                f'{row["disk_bytes_per_place"]:>12.0f} {row["ram_mb"]:>7.0f} '
                f'{row["build_s"]:>8.1f} {row["load_s"]:>7.2f} {row["p50_ms"]:>7.2f} '
                f'{row["p99_ms"]:>7.2f} {row["top1_agreement"]:>5.3f} '
                f'{row["top10_agreement"]:>6.3f} {row["real_r1"]:>5.3f} {row["append_s"]:>8.2f}',
                flush=True,
            )
    print(f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB')


if __name__ == '__main__':
    main()
