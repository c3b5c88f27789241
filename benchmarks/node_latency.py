"""Latency of the relocalize node next to the model's bare forward time, in one run.

    .venv/bin/python benchmarks/node_latency.py [--frames 200] [--places 50] [--num-threads 1]

Builds a map of synthetic 640x480 places, starts the node as its own process, then times, one
call here and one frame there in turn, so that both sides see the same machine load and the
same pattern of work and idle time (on a shared machine a call after an idle gap runs slower
than one right after another, whoever makes it):

* in this process, in rotation: the model's bare forward on a preprocessed tensor,
  extraction of a 640x480 image (preprocessing + forward), and the whole Relocalizer
  (+ faiss + MNN re-ranking);
* the node, fed 640x480 rgb8 frames one at a time (closed loop, so nothing queues): its own
  latency from image received to hypotheses published (``latency_*_ms`` on /diagnostics,
  over its last 200 frames, i.e. the timed ones), and the end-to-end time from publish to
  hypotheses received here, which adds DDS transport both ways.

Not a test: it prints figures. Runs with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a domain
id of its own (ROS_DOMAIN_ID if set, else derived from the process id).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from vpr_ros.database import PlaceDatabase, place_records
from vpr_ros.dds import dds_environment, use_shipped_profile
from vpr_ros.extraction import Extractor
from vpr_ros.images import rgb_to_image_fields
from vpr_ros.models import DEFAULT_MODEL, load_model
from vpr_ros.nodes.conversions import hypotheses_from_cloud, stamp_ns
from vpr_ros.relocalization import Relocalizer
from vpr_ros.runtime import tune_malloc
from vpr_ros.types import Frame, Pose

ROOT = Path(__file__).resolve().parents[1]
SIZE = (480, 640)  # height, width
NODE_LATENCY_WINDOW = 200  # frames the node's latency statistics cover


def place_image(index: int) -> np.ndarray:
    """A distinct 640x480 scene of coloured shapes for place ``index``."""
    rng = np.random.default_rng(index)
    height, width = SIZE
    image = np.full((height, width, 3), rng.integers(30, 90, 3), np.uint8)
    for _ in range(16):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(20, height // 3)), color, -1)
        else:
            size = rng.integers(40, 240, 2)
            cv2.rectangle(image, (x, y), (x + int(size[0]), y + int(size[1])), color, -1)
    return image


def query_image(index: int) -> np.ndarray:
    """Place ``index`` seen again: shifted and brighter."""
    moved = np.roll(place_image(index), 16, axis=1).astype(np.float32)
    return np.clip(moved * 1.15 + 5, 0, 255).astype(np.uint8)


def stats_ms(seconds: list[float]) -> tuple[float, float]:
    values = np.asarray(seconds) * 1e3
    return float(np.median(values)), float(np.percentile(values, 95))


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class InProcess:
    """The model and the Relocalizer in this process, timed one call at a time."""

    def __init__(self, map_dir: Path, model_name: str, places: int, threads: int) -> None:
        self.model = load_model(model_name)
        self.extractor = Extractor(self.model, batch_size=1, num_threads=threads)
        self.relocalizer = Relocalizer(self.model, PlaceDatabase.load(map_dir))
        self.queries = [query_image(i) for i in range(places)]
        self.tensors = [self.model.preprocessing([q]) for q in self.queries]
        self.times: dict[str, list[float]] = {'forward': [], 'extract': [], 'relocalize': []}

    @torch.inference_mode()
    def run(self, index: int, *, record: bool = True) -> None:
        """Time one call; frame ``index`` runs the forward, extraction or Relocalizer in turn,
        so that each call, like each node frame, follows the other process's work."""
        i = index % len(self.queries)
        name = ('forward', 'extract', 'relocalize')[index % 3]
        calls = {
            'forward': lambda: self.model(self.tensors[i]),
            'extract': lambda: self.extractor.extract([self.queries[i]]),
            'relocalize': lambda: self.relocalizer.relocalize(self.queries[i]),
        }
        seconds = timed(calls[name])
        if record:
            self.times[name].append(seconds)


def build_map(map_dir: Path, model_name: str, places: int, threads: int) -> None:
    model = load_model(model_name)
    images = [place_image(i) for i in range(places)]
    descriptors = Extractor(model, batch_size=8, num_threads=threads).extract(images)
    frames = [
        Frame(image=image, stamp_ns=i, pose=Pose(25.0 * i, 0.0, 0.0))
        for i, image in enumerate(images)
    ]
    PlaceDatabase(
        model.identity(),
        descriptors.global_descriptors,
        place_records(frames),
        descriptors.local_features,
    ).save(map_dir)


class NodeClient:
    """The relocalize node as its own process, and this process's publisher and subscribers."""

    def __init__(
        self, map_dir: Path, model_name: str, places: int, threads: int, domain_id: int
    ) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image, PointCloud2

        self.rclpy = rclpy
        env = dict(
            dds_environment()[0],  # the shipped Fast DDS profile, unless one is set
            ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
            ROS_DOMAIN_ID=str(domain_id),
            PYTHONUNBUFFERED='1',
        )
        command = [sys.executable, '-m', 'vpr_ros.nodes.relocalize_node', '--ros-args']
        command += ['--params-file', str(ROOT / 'config' / 'relocalize.yaml')]
        for name, value in [
            ('map_dir', str(map_dir)),
            ('model', model_name),
            ('num_threads', str(threads)),
            ('max_rate_hz', '0.0'),
            ('diagnostics_period_s', '0.5'),
        ]:
            command += ['-p', f'{name}:={value}']
        self.log = Path(tempfile.mkstemp(suffix='.log')[1])
        with self.log.open('w') as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        use_shipped_profile()  # this process publishes 640x480 frames best effort
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('latency_benchmark', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received: dict[int, tuple[float, PointCloud2]] = {}
        self.diagnostics: dict[str, str] = {}
        self.end_to_end: list[float] = []
        self.correct = 0
        self.node.create_subscription(PointCloud2, 'relocalize/hypotheses', self._on_cloud, 10)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_status, 10)
        # Best effort, as cameras publish (the node's default camera_qos is sensor_data).
        self.publisher = self.node.create_publisher(Image, 'image', qos_profile_sensor_data)
        self.messages = []
        for i in range(places):
            encoding, height, width, step, data = rgb_to_image_fields(query_image(i))
            self.messages.append(
                Image(encoding=encoding, height=height, width=width, step=step, data=data)
            )
        self.sent = 0
        if not self.spin_until(
            lambda: self.publisher.get_subscription_count() > 0 and self.diagnostics, 120
        ):
            output = self.log.read_text()
            self.close()
            raise RuntimeError(f'the node did not come up:\n{output}')

    def _on_cloud(self, msg) -> None:
        self.received[stamp_ns(msg.header.stamp)] = (time.perf_counter(), msg)

    def _on_status(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith('relocalize'):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.1)  # blocks until data: no busy wait
        return bool(predicate())

    def run(self, index: int, *, record: bool = True) -> None:
        """Send one frame and wait for its hypotheses."""
        msg = self.messages[index % len(self.messages)]
        self.sent += 1
        msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + self.sent, 0
        stamp = stamp_ns(msg.header.stamp)
        sent = time.perf_counter()
        self.publisher.publish(msg)
        if not self.spin_until(lambda: stamp in self.received, 10.0):
            raise RuntimeError(f'no answer to frame {self.sent}; diagnostics {self.diagnostics}')
        answered, cloud = self.received.pop(stamp)
        if record:
            self.end_to_end.append(answered - sent)
            self.correct += hypotheses_from_cloud(cloud)[0].place_id == index % len(self.messages)

    def node_latency_ms(self) -> tuple[float, float]:
        """The node's own median and p95 over its last 200 frames, once it counted them all."""
        self.spin_until(lambda: int(self.diagnostics['frames_processed']) >= self.sent, 5.0)
        return float(self.diagnostics['latency_median_ms']), float(
            self.diagnostics['latency_p95_ms']
        )

    def close(self) -> None:
        self.rclpy.shutdown(context=self.context)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--frames', type=int, default=NODE_LATENCY_WINDOW, help='timed node frames'
    )
    parser.add_argument('--places', type=int, default=50, help='places in the map')
    parser.add_argument('--num-threads', type=int, default=1, help='torch threads (both sides)')
    parser.add_argument('--model', default=DEFAULT_MODEL, help='model registry name or path')
    args = parser.parse_args(argv)
    if args.frames < NODE_LATENCY_WINDOW:
        parser.error(f'--frames must be >= {NODE_LATENCY_WINDOW} (the node statistics window)')
    domain_id = int(os.environ.get('ROS_DOMAIN_ID') or 1 + os.getpid() % 100)
    torch.set_num_threads(args.num_threads)
    malloc_tuned = tune_malloc()  # as the node's main() does, so both sides run alike

    with tempfile.TemporaryDirectory() as tmp:
        map_dir = Path(tmp) / 'map'
        build_map(map_dir, args.model, args.places, args.num_threads)
        bare = InProcess(map_dir, args.model, args.places, args.num_threads)
        node = NodeClient(map_dir, args.model, args.places, args.num_threads, domain_id)
        try:
            for i in range(12):  # warm-up, not timed
                bare.run(i, record=False)
                node.run(i, record=False)
            for i in range(args.frames):  # interleaved: both sides see the same machine load
                bare.run(i)
                node.run(i)
                # Let the node finish its other outputs before this process computes again:
                # woken by the hypotheses, it would otherwise take the node's core mid-publish.
                time.sleep(0.02)
            node_median, node_p95 = node.node_latency_ms()
        finally:
            node.close()

    forward = stats_ms(bare.times['forward'])
    extract = stats_ms(bare.times['extract'])
    relocalize = stats_ms(bare.times['relocalize'])
    end_to_end = stats_ms(node.end_to_end)
    print(
        f'model {args.model!r}, {args.places} places, 640x480 rgb8 input, '
        f'{args.frames} frames, torch threads {args.num_threads}, cores {os.cpu_count()}, '
        f'load average {os.getloadavg()[0]:.1f}, malloc tuned {malloc_tuned}'
    )
    print(f'{"":44s} {"median ms":>10s} {"p95 ms":>8s}')
    rows = [
        ('bare forward (preprocessed tensor)', forward),
        ('extraction (preprocess + forward, 640x480)', extract),
        ('Relocalizer.relocalize (+ faiss + re-rank)', relocalize),
        ('node: image received -> hypotheses published', (node_median, node_p95)),
        ('end to end: publish -> hypotheses received', end_to_end),
    ]
    for name, (median, p95) in rows:
        print(f'{name:44s} {median:10.1f} {p95:8.1f}')
    stages = ('wait', 'decode', 'extract', 'retrieve', 'rerank', 'publish')
    medians = {stage: float(node.diagnostics[f'{stage}_median_ms']) for stage in stages}
    print('node stages, median ms: ' + ', '.join(f'{k} {v:.1f}' for k, v in medians.items()))
    print(f'top-1 correct in the node run: {node.correct}/{args.frames}')
    for name, (median, _) in rows[:3]:
        print(f'node median over {name}: {node_median / median - 1:+.0%}')
    base = extract[0]
    overhead = node_median / base - 1
    matching = medians['retrieve'] + medians['rerank']
    ros_side = medians['wait'] + medians['decode'] + medians['publish']  # inside the latency
    verdict = 'met' if overhead <= 0.15 else 'not met'
    print(f'added to the bare forward (extraction, {base:.1f} ms), target <= +15 %:')
    for label, share, note in [
        ('node in total', overhead, verdict),
        ('of which faiss + MNN re-ranking (core)', matching / base, ''),
        ('of which ROS side (wait, decode, publish)', ros_side / base, ''),
    ]:
        print(f'  {label:42s} {share:+5.0%} {note}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
