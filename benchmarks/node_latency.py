"""The relocalize node end to end, next to the bare model forward, in one run.

    .venv/bin/python benchmarks/node_latency.py [--places 50,10000,100000] [--frames 100]
        [--num-threads 1] [--backend torch|onnxruntime|auto] [--rate-hz 30] [--stream-s 10]

For each map size it builds a map, starts the node as its own process and measures:

* **start-up**: from the node process's start (just before ``Popen``) to the first
  hypotheses received here; a probe frame is published every 50 ms until one is answered,
  so the figure includes Python start-up, imports, model and map loading and DDS discovery;
* **end to end** (closed loop, one frame at a time): from ``publish`` of a 640x480 rgb8
  frame here to its hypotheses received here (DDS both ways, deserialisation, decode,
  the whole pipeline at the default ``top_k``/``rerank_k``). Each node frame is timed next
  to the **bare forward** in this process, interleaved, so that both see the same machine
  load: the torch model on a preprocessed tensor, and (when an ONNX export of the model
  exists) the ONNX Runtime session on a resized uint8 batch, both with ``--num-threads``.
  The ratio is the median over frames of end to end / bare forward of the same pair;
* the node's **RSS** (VmRSS, and the peak VmHWM) after the timed frames;
* **30 Hz stream**: frames published at ``--rate-hz`` for ``--stream-s`` seconds with no
  waiting and no idle gaps (``max_rate_hz`` 0: the node takes the newest frame whenever it is
  free); frames answered per second and their end-to-end p50/p95.

The map holds 50 real places (synthetic 640x480 scenes, described by the model; each query
is its place shifted and brightened, and top-1 is checked) plus filler places up to the size:
global descriptors of the real places with noise (so fillers compete in retrieval), and their
local features and sequence descriptors repeated, stored as build_map stores them (flat
index, local features, sequence descriptors). Nothing here is a test: it prints figures.
ROS runs with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a domain id of its own
(ROS_DOMAIN_ID if set, else derived from the process id).
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
from vpr_ros.images import rgb_to_image_fields
from vpr_ros.models import DEFAULT_MODEL, load_model
from vpr_ros.nodes.conversions import hypotheses_from_cloud, stamp_ns
from vpr_ros.runtime import tune_malloc
from vpr_ros.sequence import patch_normalised_descriptor
from vpr_ros.types import Frame

ROOT = Path(__file__).resolve().parents[1]
SIZE = (480, 640)  # height, width
REAL_PLACES = 50
SEQUENCE_SETTINGS = {'image_size': [64, 32], 'patch': 8}  # build_map's defaults


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


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    values = np.asarray(seconds) * 1e3
    return float(np.median(values)), float(np.percentile(values, 95))


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def rss_mb(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM (peak) of process ``pid``, in MB."""
    fields = {}
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'VmHWM'):
            fields[key] = int(value.split()[0]) / 1024
    return fields['VmRSS'], fields['VmHWM']


class RealPlaces:
    """The model in this process: descriptors of the real places, and the bare forwards."""

    def __init__(self, model_name: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = load_model(model_name)
        images = [place_image(i) for i in range(REAL_PLACES)]
        with torch.inference_mode():
            outs = [self.model(self.model.preprocessing([image])) for image in images]
        self.global_descriptors = np.concatenate([o['global_descriptor'].numpy() for o in outs])
        self.local_features = np.concatenate(
            [o['local_features'].flatten(2).transpose(1, 2).numpy() for o in outs]
        ).astype(np.float16)
        self.local_grid = tuple(outs[0]['local_features'].shape[2:])
        self.sequence = patch_normalised_descriptor(
            images, tuple(SEQUENCE_SETTINGS['image_size']), SEQUENCE_SETTINGS['patch']
        ).astype(np.float16)
        queries = [query_image(i) for i in range(REAL_PLACES)]
        self.tensors = [self.model.preprocessing([q]) for q in queries]
        self.onnx = onnx_forward(self.model, queries, threads)

    def build_map(self, map_dir: Path, places: int) -> None:
        """Real places first (ids 0..49), then fillers, saved as build_map saves maps."""
        rng = np.random.default_rng(0)
        dim = self.global_descriptors.shape[1]
        global_descriptors = np.empty((places, dim), np.float32)
        global_descriptors[:REAL_PLACES] = self.global_descriptors[:places]
        for start in range(REAL_PLACES, places, 10_000):
            stop = min(places, start + 10_000)
            base = self.global_descriptors[np.arange(start, stop) % REAL_PLACES]
            noisy = base + rng.standard_normal(base.shape, np.float32) * (1.5 / np.sqrt(dim))
            global_descriptors[start:stop] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
        repeat = np.arange(places) % REAL_PLACES
        frame = Frame(image=np.zeros((1, 1, 3), np.uint8), stamp_ns=0)
        rows = place_records([frame] * places)
        rows['x'] = 25.0 * np.arange(places)
        rows['y'] = rows['z'] = rows['qx'] = rows['qy'] = rows['qz'] = 0.0
        rows['qw'] = 1.0
        PlaceDatabase(
            self.model.identity(),
            global_descriptors,
            rows,
            self.local_features[repeat],
            sequence_descriptors=self.sequence[repeat],
            sequence_conf=SEQUENCE_SETTINGS,
            local_grid=self.local_grid,
        ).save(map_dir)

    @torch.inference_mode()
    def bare_torch(self, index: int) -> float:
        return timed(lambda: self.model(self.tensors[index % REAL_PLACES]))

    def bare_onnx(self, index: int) -> float | None:
        return None if self.onnx is None else timed(lambda: self.onnx(index % REAL_PLACES))


def onnx_forward(
    model: object, queries: list[np.ndarray], threads: int
) -> Callable[[int], object] | None:
    """The ONNX Runtime forward of the model's export on query ``i`` (resized uint8), or None
    when this version of vpr_ros has no ONNX path or the model has no export."""
    try:
        from vpr_ros.extraction import OnnxExtractor, find_onnx_export
    except ImportError:
        return None
    export = find_onnx_export(str(getattr(model, 'name', '')))
    if export is None:
        return None
    extractor = OnnxExtractor(export, num_threads=threads)
    batches = [extractor.prepare([q]) for q in queries]
    return lambda i: extractor.run(batches[i])


class NodeClient:
    """The relocalize node as its own process, and this process's publisher and subscribers."""

    def __init__(
        self, map_dir: Path, model_name: str, args: argparse.Namespace, domain_id: int
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
        params = [
            ('map_dir', str(map_dir)),
            ('model', model_name),
            ('num_threads', str(args.num_threads)),
            ('max_rate_hz', '0.0'),
            ('diagnostics_period_s', '0.5'),
        ]
        if args.backend:
            params.append(('backend', args.backend))
        for name, value in params:
            command += ['-p', f'{name}:={value}']
        use_shipped_profile()  # this process publishes 640x480 frames best effort
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('latency_benchmark', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received: dict[int, tuple[float, PointCloud2]] = {}
        self.diagnostics: dict[str, str] = {}
        self.node.create_subscription(PointCloud2, 'relocalize/hypotheses', self._on_cloud, 50)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_status, 10)
        # Best effort, as cameras publish (the node's default camera_qos is sensor_data).
        self.publisher = self.node.create_publisher(Image, 'image', qos_profile_sensor_data)
        self.messages = []
        for i in range(REAL_PLACES):
            encoding, height, width, step, data = rgb_to_image_fields(query_image(i))
            self.messages.append(
                Image(encoding=encoding, height=height, width=width, step=step, data=data)
            )
        self.sent = 0
        self.log = Path(tempfile.mkstemp(suffix='.log')[1])
        started = time.perf_counter()
        with self.log.open('w') as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        self.startup_s = self._first_answer(started, timeout=300.0)

    def _first_answer(self, started: float, timeout: float) -> float:
        """Publish a probe frame every 50 ms until one is answered; seconds since start."""
        deadline = started + timeout
        while time.perf_counter() < deadline:
            self.publish(0)
            self.executor.spin_once(timeout_sec=0.05)
            if self.received:
                answered = min(t for t, _ in self.received.values())
                self.received.clear()
                return answered - started
            if self.process.poll() is not None:
                break
        output = self.log.read_text()
        self.close()
        raise RuntimeError(f'the node did not answer:\n{output}')

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

    def publish(self, index: int) -> tuple[int, float]:
        """Publish query ``index`` with a fresh stamp; (stamp ns, perf_counter at publish)."""
        msg = self.messages[index % REAL_PLACES]
        self.sent += 1
        msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + self.sent, 0
        sent = time.perf_counter()
        self.publisher.publish(msg)
        return stamp_ns(msg.header.stamp), sent

    def run(self, index: int) -> tuple[float, bool]:
        """Send one frame and wait for its hypotheses: (seconds end to end, top-1 right)."""
        stamp, sent = self.publish(index)
        if not self.spin_until(lambda: stamp in self.received, 30.0):
            raise RuntimeError(f'no answer to frame {self.sent}; diagnostics {self.diagnostics}')
        answered, cloud = self.received.pop(stamp)
        return answered - sent, hypotheses_from_cloud(cloud)[0].place_id == index % REAL_PLACES

    def stream(self, rate_hz: float, seconds: float) -> tuple[float, list[float], int]:
        """Publish at ``rate_hz`` for ``seconds`` without waiting; (answered per second,
        end-to-end seconds of the answered frames, frames sent)."""
        self.received.clear()
        sent_at: dict[int, float] = {}
        period = 1.0 / rate_hz
        start = time.perf_counter()
        count = int(rate_hz * seconds)
        for i in range(count):
            while (wait := start + i * period - time.perf_counter()) > 0:
                self.executor.spin_once(timeout_sec=wait)
            stamp, sent = self.publish(i)
            sent_at[stamp] = sent
        end = start + count * period
        self.spin_until(lambda: False, 1.0)  # answers to the last frames
        answered = {s: t for s, (t, _) in self.received.items() if s in sent_at}
        in_window = sum(t <= end for t in answered.values())
        latencies = [t - sent_at[s] for s, t in answered.items()]
        return in_window / (end - start), latencies, count

    def close(self) -> None:
        self.rclpy.shutdown(context=self.context)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.unlink(missing_ok=True)


def measure(
    real: RealPlaces, places: int, args: argparse.Namespace, domain_id: int
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        map_dir = Path(tmp) / 'map'
        real.build_map(map_dir, places)
        node = NodeClient(map_dir, args.model, args, domain_id)
        try:
            for i in range(10):  # warm-up, not timed
                real.bare_torch(i)
                real.bare_onnx(i)
                node.run(i)
            torch_s, onnx_s, end_to_end, correct = [], [], [], 0
            for i in range(args.frames):  # interleaved: both sides see the same load
                torch_s.append(real.bare_torch(i))
                onnx_time = real.bare_onnx(i)
                if onnx_time is not None:
                    onnx_s.append(onnx_time)
                seconds, right = node.run(i)
                end_to_end.append(seconds)
                correct += right
            rss, peak = rss_mb(node.process.pid)
            rate, stream_latency, stream_sent = node.stream(args.rate_hz, args.stream_s)
            stream_rss, stream_peak = rss_mb(node.process.pid)
            stages = {
                k[: -len('_median_ms')]: float(v)
                for k, v in node.diagnostics.items()
                if k.endswith('_median_ms')
            }
        finally:
            node.close()
    e2e = np.asarray(end_to_end)
    return {
        'places': places,
        'startup_s': node.startup_s,
        'e2e': percentiles_ms(end_to_end),
        'torch': percentiles_ms(torch_s),
        'onnx': percentiles_ms(onnx_s) if onnx_s else None,
        'ratio_torch': float(np.median(e2e / np.asarray(torch_s))),
        'ratio_onnx': float(np.median(e2e / np.asarray(onnx_s))) if onnx_s else None,
        'correct': correct,
        'rss_mb': max(rss, stream_rss),
        'peak_mb': max(peak, stream_peak),
        'stream_rate': rate,
        'stream_sent': stream_sent,
        'stream_e2e': percentiles_ms(stream_latency) if stream_latency else (np.nan, np.nan),
        'stages': stages,
    }


def help_seconds() -> dict[str, float]:
    """Seconds to answer ``--help``, per command (a fresh Python each)."""
    out = {}
    for command in ('build_map', 'evaluate', 'export_onnx'):
        module = f'vpr_ros.cli.{command}'
        try:
            __import__(module)
        except ImportError:
            continue
        start = time.perf_counter()
        subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, check=True)
        out[command] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('--places', default='50,10000,100000', help='map sizes, comma-separated')
    parser.add_argument('--frames', type=int, default=100, help='timed closed-loop frames')
    parser.add_argument(
        '--num-threads', type=int, default=1, help='threads of the node and the bare forwards'
    )
    parser.add_argument('--model', default=DEFAULT_MODEL, help='model registry name or path')
    parser.add_argument(
        '--backend',
        default='',
        help="the node's backend parameter (empty: the node's default; versions without "
        'the parameter run torch)',
    )
    parser.add_argument('--rate-hz', type=float, default=30.0, help='camera rate of the stream')
    parser.add_argument('--stream-s', type=float, default=10.0, help='stream duration')
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.places.split(',')]
    domain_id = int(os.environ.get('ROS_DOMAIN_ID') or 1 + os.getpid() % 100)
    malloc_tuned = tune_malloc()  # as the node's main() does, so both sides run alike
    real = RealPlaces(args.model, args.num_threads)
    print(
        f'model {args.model!r}, node backend {args.backend or "(default)"}, 640x480 rgb8, '
        f'{args.frames} frames, threads {args.num_threads}, cores {os.cpu_count()}, '
        f'load average {os.getloadavg()[0]:.1f}, malloc tuned {malloc_tuned}, '
        f'ONNX bare forward {"yes" if real.onnx else "no (no export)"}',
        flush=True,
    )
    rows = []
    for places in sizes:
        row = measure(real, places, args, domain_id)
        rows.append(row)
        stages = ', '.join(f'{k} {v:.1f}' for k, v in row['stages'].items())
        print(f'  {places} places: node stages, median ms: {stages}', flush=True)
    header = (
        f'{"places":>7s} {"e2e p50":>8s} {"p95":>6s} {"torch p50":>9s} {"p95":>6s} '
        f'{"e2e/torch":>9s} {"ort p50":>8s} {"e2e/ort":>7s} {"top-1":>6s} {"RSS MB":>7s} '
        f'{"peak":>6s} {"start s":>7s} {"30Hz ans/s":>10s} {"p50":>6s} {"p95":>6s}'
    )
    print(header)
    for r in rows:
        onnx = (
            f'{r["onnx"][0]:8.1f} {r["ratio_onnx"]:7.2f}' if r['onnx'] else f'{"-":>8s} {"-":>7s}'
        )
        print(
            f'{r["places"]:7d} {r["e2e"][0]:8.1f} {r["e2e"][1]:6.1f} {r["torch"][0]:9.1f} '
            f'{r["torch"][1]:6.1f} {r["ratio_torch"]:9.2f} {onnx} '
            f'{r["correct"]:3d}/{args.frames:<3d}{r["rss_mb"]:7.0f} {r["peak_mb"]:6.0f} '
            f'{r["startup_s"]:7.2f} {r["stream_rate"]:10.1f} {r["stream_e2e"][0]:6.1f} '
            f'{r["stream_e2e"][1]:6.1f}'
        )
    print(
        'times in ms; e2e = camera publish -> hypotheses received; ratios are medians of '
        'per-frame pairs; start = process start -> first hypotheses'
    )
    for command, seconds in help_seconds().items():
        print(f'{command} --help: {seconds:.2f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
