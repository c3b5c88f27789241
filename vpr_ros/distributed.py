"""build_map over many bags on Ray: one shard map per bag, built by workers, merged into one.

Ray (an existing engine, not a home-made one) schedules the shards: locally by default
(``ray.init`` with ``workers`` CPUs), or on a cluster given its address. Each task loads the
model once, builds the map of its bag with ``vpr_ros.mapping.build_map`` into a shard
directory beside the output, and returns its summary; the driver then merges the shards in
bag order with ``PlaceDatabase.extend`` (their columns are hard-linked, not copied) and
saves the result under the map's writer lock. On a cluster the output's parent directory
must be shared by the nodes, and vpr_ros installed on them.

Bags with NavSatFix poses each get the ENU origin of their own first fix; shards with
different origins are refused at the merge (build those bags in one process).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vpr_ros import logger
from vpr_ros.database import PlaceDatabase, check_map_target, map_files, map_lock
from vpr_ros.mapping import BuildConf, BuildSummary


def _build_shard(
    model_source: str,
    bag: str,
    image_topic: str,
    pose_topic: str | None,
    shard_dir: str,
    conf: dict[str, Any],
    num_threads: int,
) -> dict[str, Any]:
    """One Ray task: the map of one bag, written to ``shard_dir``; returns its summary."""
    from vpr_ros.mapping import build_map
    from vpr_ros.models import load_model

    started = time.perf_counter()
    model = load_model(model_source)
    summary = build_map(
        model,
        [bag],
        image_topic,
        pose_topic,
        shard_dir,
        conf=conf,
        num_threads=num_threads,
        progress=False,
    )
    return {
        'messages_read': summary.messages_read,
        'keyframes': summary.keyframes,
        'not_keyframes': summary.not_keyframes,
        'skipped': dict(summary.skipped.counts),
        'seconds': time.perf_counter() - started,
        'pid': os.getpid(),
    }


def build_map_ray(
    model_source: str,
    bags: Sequence[str | os.PathLike[str]],
    image_topic: str,
    pose_topic: str | None,
    out_dir: str | os.PathLike[str],
    *,
    conf: BuildConf | Mapping[str, Any] | None = None,
    append: bool = False,
    workers: int = 2,
    ray_address: str | None = None,
    threads_per_worker: int = 1,
    lock_timeout_s: float = 0.0,
) -> BuildSummary:
    """Build (or extend) the map at ``out_dir`` from ``bags``, one Ray task per bag.

    Args:
        model_source: a model name or exported model path (each worker loads it).
        workers: CPUs of a local Ray instance (ignored with ``ray_address``).
        ray_address: a running cluster's address ('auto', 'ray://host:10001'), or None
            for a local instance.
        threads_per_worker: torch threads of each task.

    Raises:
        DatabaseError, BagReadError, ModelError: as ``mapping.build_map``; a failed task's
            error is raised again here and nothing is written.
    """
    import ray

    started = time.perf_counter()
    out = Path(out_dir)
    check_map_target(out, what='--out')
    conf_dict = (
        conf.to_dict()
        if isinstance(conf, BuildConf)
        else BuildConf.from_dict(dict(conf or {})).to_dict()
    )
    shard_root = out.parent / f'.{out.name}.shards-{secrets.token_hex(4)}'
    shard_root.mkdir(parents=True)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(
            address=ray_address,
            num_cpus=None if ray_address else workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_build_shard)
        shards = [shard_root / f'shard-{i:04d}' for i in range(len(bags))]
        pending = [
            task.remote(
                str(model_source),
                str(bag),
                image_topic,
                pose_topic,
                str(shard),
                conf_dict,
                threads_per_worker,
            )  # fmt: skip
            for bag, shard in zip(bags, shards)
        ]
        try:
            results = ray.get(pending)
        except ray.exceptions.RayTaskError as err:  # the task's own error (BagReadError...)
            cause = getattr(err, 'cause', None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        summary = BuildSummary()
        for result in results:
            summary.messages_read += result['messages_read']
            summary.keyframes += result['keyframes']
            summary.not_keyframes += result['not_keyframes']
            for reason, count in result['skipped'].items():
                summary.skipped.counts[reason] = summary.skipped.counts.get(reason, 0) + count
        logger.info(
            'built %d shards on %d worker processes (%.1f s of work)',
            len(results),
            len({r['pid'] for r in results}),
            sum(r['seconds'] for r in results),
        )
        with map_lock(out, timeout_s=lock_timeout_s):
            merged = None
            if append and PlaceDatabase.is_map(out):
                merged = PlaceDatabase.load(out)
            for shard in shards:
                part = PlaceDatabase.load(shard)
                if merged is None:
                    merged = part
                else:
                    merged.extend(part)
            assert merged is not None
            path = merged.save(out)
        summary.places_in_map = len(merged)
        summary.map_bytes = sum(f.stat().st_size for f in map_files(path))
        summary.seconds = time.perf_counter() - started
        return summary
    finally:
        shutil.rmtree(shard_root, ignore_errors=True)
        if owns_ray:
            ray.shutdown()
