"""demo: the main job end to end, over real DDS.

1. make a route with known ground truth: real photos (shipped in the scikit-image wheel)
   as places 8 m apart, each viewed again with a viewpoint and a lighting change as the
   queries; or, with ``--dataset``, a real route (e.g. ``../shared/datasets/campus_route``:
   even frames build the map, odd frames are the queries);
2. write a map bag (mcap) and a query bag (sqlite3) with images and odometry;
3. run ``build_map`` on the map bag;
4. start the ``relocalize`` node as its own process;
5. play the query bag into it over DDS, one frame at a time, and collect what it publishes;
6. print R@1, the latency from publishing a frame to receiving its hypotheses, and the
   first hypotheses.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from vpr_ros.bagio import read_frames, write_bag
from vpr_ros.errors import ConfigError, VprError
from vpr_ros.images import rgb_to_image_fields
from vpr_ros.models import DEFAULT_MODEL
from vpr_ros.types import Frame, Pose

IMAGE_TOPIC = '/camera/image_raw'
POSE_TOPIC = '/odom'
NODE_NAME = 'relocalize'
PHOTOS = [
    'astronaut.png', 'camera.png', 'chelsea.png', 'coffee.png', 'rocket.jpg',
    'motorcycle_left.png', 'hubble_deep_field.jpg', 'ihc.png', 'retina.jpg', 'moon.png',
    'brick.png', 'grass.png', 'gravel.png', 'coins.png', 'page.png', 'text.png',
    'clock_motion.png', 'cell.png', 'color.png', 'logo.png',
]  # fmt: skip
# The one real second viewpoint that ships: a stereo pair.
REAL_SECOND_VIEW = {'motorcycle_left.png': 'motorcycle_right.png'}
PLACE_SPACING_M = 8.0
FRAME_SIZE = (480, 640)  # height, width of the generated camera frames


def _yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return 0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)


def _load_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigError(f'cannot read image {str(path)!r}')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _fit(image: np.ndarray, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """Centre-crop to the frame's aspect ratio, then resize: a camera frame."""
    height, width = size
    h, w = image.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = int(height * scale), int(width * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(image[top : top + ch, left : left + cw], (width, height))


def view_again(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The place seen again: a perspective change (camera moved and turned) and a
    lighting change (gain, gamma, colour cast), plus sensor noise."""
    h, w = image.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(-0.07, 0.07, (4, 2)) * [w, h]
    warp = cv2.getPerspectiveTransform(corners, np.float32(corners + jitter))
    moved = cv2.warpPerspective(image, warp, (w, h), borderMode=cv2.BORDER_REFLECT)
    light = moved.astype(np.float32) / 255.0
    light = np.power(light, rng.uniform(0.7, 1.4)) * rng.uniform(0.75, 1.2)
    light *= rng.uniform(0.9, 1.1, 3)  # colour cast
    light += rng.normal(0, 0.015, light.shape)
    return np.clip(light * 255, 0, 255).astype(np.uint8)


def photo_route(seed: int = 0) -> tuple[list[Frame], list[Frame]]:
    """Map and query frames of a route through real photos, ground truth known."""
    try:
        import skimage.data
    except ImportError as err:
        msg = "the demo's photo route needs scikit-image (pip install scikit-image)"
        raise ConfigError(msg) from err
    folder = Path(skimage.data.__file__).parent
    rng = np.random.default_rng(seed)
    map_frames, query_frames = [], []
    for i, name in enumerate(PHOTOS):
        photo = _fit(_load_rgb(folder / name))
        pose = Pose(i * PLACE_SPACING_M, 0.0, 0.0)
        map_frames.append(Frame(photo, 10**9 + i * 10**9, 'camera', pose))
        if name in REAL_SECOND_VIEW:
            query = _fit(_load_rgb(folder / REAL_SECOND_VIEW[name]))
        else:
            query = view_again(photo, rng)
        query_pose = Pose(pose.x + rng.uniform(-1, 1), rng.uniform(-1, 1), 0.0)
        query_frames.append(Frame(query, 10**9 + i * 10**9, 'camera', query_pose))
    return map_frames, query_frames


def dataset_route(path: Path) -> tuple[list[Frame], list[Frame]]:
    """A real route from ``data.csv`` (file,x,y,yaw) and its images: even frames are the
    map, odd frames the queries."""
    table = path / 'data.csv'
    if not table.is_file():
        raise ConfigError(f'{str(path)!r} has no data.csv (file,x,y,yaw); see --help')
    with table.open() as stream:
        rows = [row for row in csv.reader(stream) if row and not row[0].startswith('#')]
    if rows and rows[0][0] == 'file':
        rows = rows[1:]
    frames = []
    for i, (name, x, y, yaw) in enumerate(rows):
        pose = Pose(float(x), float(y), 0.0, *_yaw_quaternion(float(yaw)))
        frames.append(Frame(_load_rgb(path / name), 10**9 + i * 500_000_000, 'camera', pose))
    return frames[0::2], frames[1::2]


def _ros_env() -> dict[str, str]:
    env = dict(os.environ)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 90))
    env['PYTHONUNBUFFERED'] = '1'
    return env


def play_and_collect(
    query_bag: Path, env: dict[str, str], timeout_s: float
) -> tuple[list[Frame], dict[int, tuple[list, float]], dict[int, object]]:
    """Publish the query bag's frames one at a time, waiting for each one's hypotheses.

    Returns the query frames (with ground-truth poses), the hypotheses and latency per
    stamp, and the ``~/pose`` messages per stamp.
    """
    os.environ.update({k: env[k] for k in ('ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_DOMAIN_ID')})
    import rclpy
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2

    from vpr_ros.nodes.conversions import hypotheses_from_cloud, stamp_ns

    frames = list(read_frames([query_bag], IMAGE_TOPIC, POSE_TOPIC))
    results: dict[int, tuple[list, float]] = {}
    poses: dict[int, object] = {}
    sent: dict[int, float] = {}
    with rclpy.init():
        node = rclpy.create_node('vpr_demo_player')
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        publisher = node.create_publisher(Image, IMAGE_TOPIC, reliable)

        def on_hypotheses(msg: PointCloud2) -> None:
            stamp = stamp_ns(msg.header.stamp)
            if stamp in sent:
                results[stamp] = (hypotheses_from_cloud(msg), time.perf_counter() - sent[stamp])

        def on_pose(msg: PoseWithCovarianceStamped) -> None:
            poses[stamp_ns(msg.header.stamp)] = msg

        node.create_subscription(PointCloud2, f'/{NODE_NAME}/hypotheses', on_hypotheses, 10)
        node.create_subscription(PoseWithCovarianceStamped, f'/{NODE_NAME}/pose', on_pose, 10)
        deadline = time.monotonic() + timeout_s
        while publisher.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                raise VprError('the relocalize node did not subscribe to the camera topic')
            rclpy.spin_once(node, timeout_sec=0.1)
        time.sleep(0.5)  # let the node's publishers match ours
        for frame in frames:
            encoding, height, width, step, data = rgb_to_image_fields(frame.image)
            msg = Image(encoding=encoding, height=height, width=width, step=step, data=data)
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(frame.stamp_ns, 10**9)
            msg.header.frame_id = frame.frame_id
            sent[frame.stamp_ns] = time.perf_counter()
            publisher.publish(msg)
            wait_until = time.monotonic() + 30.0
            while frame.stamp_ns not in results and time.monotonic() < wait_until:
                rclpy.spin_once(node, timeout_sec=0.05)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
        node.destroy_node()
    return frames, results, poses


def run_demo(
    dataset: Path | None, work_dir: Path, *, radius_m: float, model: str, threads: int
) -> int:
    map_frames, query_frames = dataset_route(dataset) if dataset else photo_route()
    print(
        f'route: {len(map_frames)} map frames, {len(query_frames)} query frames '
        f'({"dataset " + str(dataset) if dataset else "real photos, viewed again"})'
    )
    map_bag = write_bag(work_dir / 'map_bag', map_frames, storage='mcap')
    query_bag = write_bag(work_dir / 'query_bag', query_frames, storage='sqlite3')
    map_dir = work_dir / 'map'
    # Places are a few metres apart: keep every map frame.
    build = [
        sys.executable, '-m', 'vpr_ros.cli.build_map', '--bag', str(map_bag),
        '--image-topic', IMAGE_TOPIC, '--pose-topic', POSE_TOPIC, '--out', str(map_dir),
        '--min-distance-m', '0.5', '--model', model, '--no-progress',
    ]  # fmt: skip
    print('$', ' '.join(build[2:]))
    subprocess.run(build, check=True)

    env = _ros_env()
    node_cmd = [
        sys.executable, '-m', 'vpr_ros.nodes.relocalize_node', '--ros-args',
        '-p', f'map_dir:={map_dir}', '-p', f'model:={model}',
        '-p', f'camera_topics:=[{IMAGE_TOPIC}]', '-p', 'camera_qos:=reliable',
        '-p', 'max_rate_hz:=0.0', '-p', f'num_threads:={threads}',
    ]  # fmt: skip
    print('$ relocalize', ' '.join(node_cmd[3:]))
    log_path = work_dir / 'relocalize.log'
    with log_path.open('w') as log:
        node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            frames, results, pose_msgs = play_and_collect(query_bag, env, timeout_s=120)
        finally:
            node.terminate()
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
    if not results:
        print(log_path.read_text()[-3000:], file=sys.stderr)
        raise VprError('the relocalize node published no hypotheses; its log is above')
    return report(frames, results, pose_msgs, radius_m)


def report(frames: Sequence[Frame], results: dict, pose_msgs: dict, radius_m: float) -> int:
    correct, latencies, accepted, accepted_correct = 0, [], 0, 0
    lines = []
    for frame in frames:
        if frame.stamp_ns not in results:
            continue
        hypotheses, latency = results[frame.stamp_ns]
        latencies.append(latency)
        best = hypotheses[0] if hypotheses else None
        error = math.inf
        if best is not None and best.pose is not None:
            error = math.dist((best.pose.x, best.pose.y), (frame.pose.x, frame.pose.y))
        hit = error <= radius_m
        correct += hit
        if frame.stamp_ns in pose_msgs:
            accepted += 1
            accepted_correct += hit
        if len(lines) < 5 and best is not None:
            top = ', '.join(
                f'place {h.place_id} (global {h.global_score:.3f}, rerank {h.rerank_score:.3f}, '
                f'conf {h.confidence:.2f})'
                for h in hypotheses[:3]
            )
            lines.append(
                f'  query at ({frame.pose.x:6.1f}, {frame.pose.y:6.1f}): {top} '
                f'-> {"correct" if hit else "wrong"} ({error:.1f} m)'
            )
    answered = len(latencies)
    latencies_ms = np.array(latencies) * 1e3
    print('\nfirst hypotheses (best first):')
    print('\n'.join(lines))
    print(f'\nqueries answered: {answered} / {len(frames)}')
    print(f'R@1 (best hypothesis within {radius_m:g} m): {100 * correct / len(frames):.1f} %')
    print(
        f'~/pose published (confidence >= threshold): {accepted}, of which correct: '
        f'{accepted_correct}'
    )
    print(
        f'latency publish -> hypotheses: median {np.median(latencies_ms):.0f} ms, '
        f'p95 {np.percentile(latencies_ms, 95):.0f} ms'
    )
    return 0 if answered == len(frames) else 1


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='demo',
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--dataset',
        type=Path,
        help='a real route folder with data.csv (file,x,y,yaw in metres/radians) and its '
        'images, e.g. ../shared/datasets/campus_route; default: the generated photo route',
    )
    parser.add_argument('--work-dir', type=Path, help='keep bags, map and node log here')
    parser.add_argument(
        '--radius-m',
        type=float,
        default=5.0,
        help='a best hypothesis within this distance of the query pose is correct (metres)',
    )
    parser.add_argument('--model', default=DEFAULT_MODEL, help='registry model')
    parser.add_argument('--threads', type=int, default=2, help='torch threads of the node')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix='vpr_demo_'))
    marker = work_dir / '.vpr_demo'
    if args.work_dir and work_dir.exists() and any(work_dir.iterdir()):
        if not marker.exists():
            print(
                f'error: --work-dir {str(work_dir)!r} is not empty; choose a new directory',
                file=sys.stderr,
            )
            return 1
        shutil.rmtree(work_dir)  # the demo's own earlier output
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        return run_demo(
            args.dataset,
            work_dir,
            radius_m=args.radius_m,
            model=args.model,
            threads=args.threads,
        )
    except (VprError, FileNotFoundError, subprocess.CalledProcessError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == '__main__':
    raise SystemExit(main())
