"""demo: the main job end to end, over real DDS.

1. make a route with known ground truth: real photos (shipped in the scikit-image wheel)
   as places 8 m apart, each viewed again with a viewpoint and a lighting change as the
   queries; or, with ``--dataset``, a real route (e.g. ``../shared/datasets/campus_route``:
   even frames build the map, odd frames are the queries);
2. write a map bag (mcap) and a query bag (sqlite3) with images and odometry;
3. run ``build_map`` on the map bag;
4. start the ``relocalize`` node as its own process;
5. play the query bag into it over DDS, one frame at a time, with the ``demo_client`` node
   (``vpr_ros.nodes.demo_client``, another process), which records what comes back;
6. print R@1, the latency from publishing a frame to receiving its hypotheses, the first
   hypotheses, and how many ``~/pose`` messages the node's ``pose_policy`` (``on_change``)
   published and why, against what ``every_frame`` would have published;
7. with ``--dataset``: run the loop-closure detector (``vpr_ros.loop_closure``, what the node
   runs with ``loop_closure.enabled``) along the whole route in driving order, twice, and
   print what the route's end retrieves and the closures of the second lap.

This module stays ROS-free: everything that speaks ROS runs in the node processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vpr_ros.errors import ConfigError, VprError
from vpr_ros.models import DEFAULT_MODEL
from vpr_ros.types import Frame, Hypothesis, Pose, RelativePose

if TYPE_CHECKING:
    import numpy as np

# numpy, OpenCV and the bag reader and writer load when the demo runs: --help stays fast.

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
ROBOT_SPEED_MPS = 2.0
"""Camera stamps follow a robot driving at this speed: the pose policy's belief advances
along the map at up to max_speed_mps (3 m/s), so a slower robot makes no jumps."""
FRAME_SIZE = (480, 640)  # height, width of the generated camera frames


def _yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return 0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)


def _fit(image: np.ndarray, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """Centre-crop to the frame's aspect ratio, then resize: a camera frame."""
    import cv2

    height, width = size
    h, w = image.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = int(height * scale), int(width * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(image[top : top + ch, left : left + cw], (width, height))


def view_again(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The place seen again: a perspective change (camera moved and turned) and a
    lighting change (gain, gamma, colour cast), plus sensor noise."""
    import cv2
    import numpy as np

    h, w = image.shape[:2]
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    jitter = rng.uniform(-0.07, 0.07, (4, 2)) * [w, h]
    warp = cv2.getPerspectiveTransform(corners, (corners + jitter).astype(np.float32))
    moved = cv2.warpPerspective(image, warp, (w, h), borderMode=cv2.BORDER_REFLECT)
    light = moved.astype(np.float32) / 255.0
    light = np.power(light, rng.uniform(0.7, 1.4)) * rng.uniform(0.75, 1.2)
    light *= rng.uniform(0.9, 1.1, 3)  # colour cast
    light += rng.normal(0, 0.015, light.shape)
    viewed: np.ndarray = np.clip(light * 255, 0, 255).astype(np.uint8)
    return viewed


def photo_route(seed: int = 0) -> tuple[list[Frame], list[Frame]]:
    """Map and query frames of a route through real photos, ground truth known."""
    import numpy as np

    from vpr_ros.imagefolders import load_image

    try:
        import skimage.data
    except ImportError as err:
        msg = "the demo's photo route needs scikit-image (pip install scikit-image)"
        raise ConfigError(msg) from err
    folder = Path(skimage.data.__file__).parent
    rng = np.random.default_rng(seed)
    map_frames, query_frames = [], []
    for i, name in enumerate(PHOTOS):
        photo = _fit(load_image(folder / name))
        pose = Pose(i * PLACE_SPACING_M, 0.0, 0.0)
        stamp = 10**9 + round(i * PLACE_SPACING_M / ROBOT_SPEED_MPS * 10**9)
        map_frames.append(Frame(photo, stamp, 'camera', pose))
        if name in REAL_SECOND_VIEW:
            query = _fit(load_image(folder / REAL_SECOND_VIEW[name]))
        else:
            query = view_again(photo, rng)
        query_pose = Pose(pose.x + rng.uniform(-1, 1), rng.uniform(-1, 1), 0.0)
        query_frames.append(Frame(query, stamp, 'camera', query_pose))
    return map_frames, query_frames


def dataset_route(path: Path) -> tuple[list[Frame], list[Frame]]:
    """A real route from ``data.csv`` (file,x,y,yaw) and its images: even frames are the
    map, odd frames the queries."""
    frames = dataset_frames(path)
    return frames[0::2], frames[1::2]


def dataset_frames(path: Path) -> list[Frame]:
    """Every frame of a real route in driving order, poses in 'map', stamped as a robot at
    ``ROBOT_SPEED_MPS`` would see them."""
    from vpr_ros.imagefolders import load_image

    table = path / 'data.csv'
    if not table.is_file():
        raise ConfigError(f'{str(path)!r} has no data.csv (file,x,y,yaw); see --help')
    with table.open() as stream:
        rows = [row for row in csv.reader(stream) if row and not row[0].startswith('#')]
    if rows and rows[0][0] == 'file':
        rows = rows[1:]
    frames: list[Frame] = []
    driven_m, previous = 0.0, None
    for name, x, y, yaw in rows:
        pose = Pose(float(x), float(y), 0.0, *_yaw_quaternion(float(yaw)))
        if previous is not None:
            driven_m += math.dist((previous.x, previous.y), (pose.x, pose.y))
        previous = pose
        stamp = 10**9 + round(driven_m / ROBOT_SPEED_MPS * 10**9)
        frames.append(Frame(load_image(path / name), stamp, 'camera', pose, 'map'))
    return frames


def _ros_env() -> dict[str, str]:
    """The node processes' environment: loopback discovery only, a domain of their own."""
    from vpr_ros.dds import dds_environment

    env, note = dds_environment()  # the shipped Fast DDS profile, unless one is set
    print(note)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 90))
    env['PYTHONUNBUFFERED'] = '1'
    return env


def _relative_pose(fields: dict | None) -> RelativePose | None:
    """A relative pose as the demo client wrote it (dataclasses.asdict), or None."""
    if not fields:
        return None
    return RelativePose(Pose(**fields['pose']), bool(fields['metric']), int(fields['inliers']))


def _answers(path: Path) -> dict[int, tuple[list[Hypothesis], float, bool]]:
    """The demo client's answers: camera stamp -> (hypotheses, latency in s, ~/pose came)."""
    answers: dict[int, tuple[list[Hypothesis], float, bool]] = {}
    for answer in json.loads(path.read_text())['answers']:
        hypotheses = [
            Hypothesis(
                **{
                    **h,
                    'pose': Pose(**h['pose']) if h['pose'] else None,
                    'relative_pose': _relative_pose(h.get('relative_pose')),
                }
            )
            for h in answer['hypotheses']
        ]
        answers[int(answer['stamp_ns'])] = (
            hypotheses,
            float(answer['latency_s']),
            bool(answer['pose_published']),
        )
    return answers


def run_demo(
    dataset: Path | None, work_dir: Path, *, radius_m: float, model: str, threads: int
) -> int:
    from vpr_ros.bagio import read_frames
    from vpr_ros.bagwriter import write_bag

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
        '-p', f'camera_topics:=[{IMAGE_TOPIC}]',
        '-p', 'max_rate_hz:=0.0', '-p', f'num_threads:={threads}',
    ]  # fmt: skip
    print('$ relocalize', ' '.join(node_cmd[3:]))
    answers_path = work_dir / 'answers.json'
    client_cmd = [
        sys.executable, '-m', 'vpr_ros.nodes.demo_client', str(query_bag),
        '--out', str(answers_path), '--topic', IMAGE_TOPIC, '--node', NODE_NAME,
    ]  # fmt: skip
    print('$ demo_client', ' '.join(client_cmd[3:]))
    log_path = work_dir / 'relocalize.log'
    with log_path.open('w') as log:
        node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            subprocess.run(client_cmd, env=env, check=False)
        finally:
            node.terminate()
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
    answers = _answers(answers_path) if answers_path.exists() else {}
    if not answers:
        print(log_path.read_text()[-3000:], file=sys.stderr)
        raise VprError('the relocalize node published no hypotheses; its log is above')
    frames = list(read_frames([query_bag], IMAGE_TOPIC, POSE_TOPIC))  # with ground truth
    status = report(frames, answers, radius_m)
    report_pose_policy(answers, log_path.read_text())
    if dataset:
        report_loop_closure(dataset_frames(dataset), model=model, threads=threads)
    return status


_PUBLISHED = re.compile(r'published ~/pose for the frame at (\d+)\.(\d+): .*: (\w+)[^:]*$')


def pose_publications(log: str) -> list[tuple[int, str]]:
    """(camera stamp, cause) of each ``~/pose`` the node's log says it published."""
    found = []
    for line in log.splitlines():
        match = _PUBLISHED.search(line)
        if match:
            sec, nanosec, cause = match.groups()
            found.append((int(sec) * 10**9 + int(nanosec), cause))
    return found


def report_pose_policy(
    answers: Mapping[int, tuple[list[Hypothesis], float, bool]], log: str
) -> None:
    """How many poses the default policy (on_change) published and why, against
    every_frame (every answer that reaches confidence_threshold)."""
    from vpr_ros.pose_policy import PosePolicyConf

    conf = PosePolicyConf()
    threshold = conf.confidence_threshold
    confident = sum(
        1
        for hypotheses, _, _ in answers.values()
        if hypotheses and hypotheses[0].confidence >= threshold
    )
    published = pose_publications(log)
    causes: dict[str, int] = {}
    for _, cause in published:
        causes[cause] = causes.get(cause, 0) + 1
    why = ', '.join(f'{n} {cause}' for cause, n in sorted(causes.items())) or 'none'
    print(
        f'\n~/pose with pose_policy {conf.pose_policy}: {len(published)} published ({why}) '
        f'for {len(answers)} frames; every_frame would have published {confident} '
        f'(confidence >= {threshold:g})'
    )
    for stamp, cause in published[:5]:
        print(f'  frame at {stamp / 1e9:.3f} s: {cause}')


def report_loop_closure(frames: Sequence[Frame], *, model: str, threads: int) -> None:
    """Drive the route twice through the loop-closure detector (the second lap sees every
    place again with a viewpoint and lighting change) and print what it finds: the route's
    own end, which comes back to its start, and the second lap."""
    import numpy as np

    from vpr_ros.loop_closure import LoopClosureConf, LoopClosureDetector
    from vpr_ros.models import load_model
    from vpr_ros.relocalization import RelocalizationConf

    conf = LoopClosureConf()
    threshold = conf.confidence_threshold
    detector = LoopClosureDetector(
        load_model(model), conf, RelocalizationConf(), num_threads=threads
    )
    n = len(frames)
    lap_ns = frames[-1].stamp_ns - frames[0].stamp_ns + 2 * 10**9
    rng = np.random.default_rng(1)
    second = [
        Frame(view_again(f.image, rng), f.stamp_ns + lap_ns, f.frame_id, f.pose, f.pose_frame_id)
        for f in frames
    ]
    route = [*frames, *second]
    print(
        f'\nloop closure, the route driven twice ({n} frames a lap; recent past: younger than '
        f'{conf.exclusion_s:g} s or nearer than {conf.exclusion_m:g} m driven; confidence >= '
        f'{threshold:g}):'
    )
    stamp_index = {f.stamp_ns: i for i, f in enumerate(route)}
    closed: dict[int, int] = {}
    end_lines = []
    for i, frame in enumerate(route):
        result = detector.process(
            frame.image, frame.stamp_ns, frame.pose, confidence_threshold=threshold
        )
        if result.closures:
            closed[i] = stamp_index[result.closures[0].place_stamp_ns]
        if n - 4 <= i < n and result.hypotheses:
            best = result.hypotheses[0]
            place = stamp_index[int(detector.database.places['stamp_ns'][best.place_index])]
            end_lines.append(
                f'  frame {i} (t={frame.stamp_ns / 1e9:.1f} s) retrieves frame {place} '
                f'(t={route[place].stamp_ns / 1e9:.1f} s, {_distance_m(frame, route[place]):.1f} '
                f'm away), confidence {best.confidence:.2f}'
                + (' -> closure' if result.closures else '')
            )
    print("  first lap, the route's end coming back to its start:")
    print('\n'.join(end_lines))
    first = {i: p for i, p in closed.items() if i < n}
    again = {i: p for i, p in closed.items() if i >= n}
    right = sum(_distance_m(route[i], route[p]) <= 10.0 for i, p in closed.items())
    print(
        f'  closures: {len(first)} in the first lap, {len(again)} of {n} frames in the second; '
        f'{right} of {len(closed)} name a place within 10 m'
    )
    for i, place in list(again.items())[:3]:
        print(
            f'  frame {i} (stamp {route[i].stamp_ns}) closes with frame {place} (stamp '
            f'{route[place].stamp_ns}, {(route[i].stamp_ns - route[place].stamp_ns) / 1e9:.0f} '
            's earlier)'
        )


def _distance_m(a: Frame, b: Frame) -> float:
    if a.pose is None or b.pose is None:
        return math.nan
    return math.dist((a.pose.x, a.pose.y), (b.pose.x, b.pose.y))


def report(
    frames: Sequence[Frame],
    answers: Mapping[int, tuple[list[Hypothesis], float, bool]],
    radius_m: float,
) -> int:
    """Print R@1, latency and the first hypotheses; 0 if every frame was answered."""
    import numpy as np

    correct, accepted, accepted_correct = 0, 0, 0
    latencies: list[float] = []
    lines: list[str] = []
    for frame in frames:
        if frame.stamp_ns not in answers or frame.pose is None:
            continue
        hypotheses, latency, pose_published = answers[frame.stamp_ns]
        latencies.append(latency)
        best = hypotheses[0] if hypotheses else None
        error = math.inf
        if best is not None and best.pose is not None:
            error = math.dist((best.pose.x, best.pose.y), (frame.pose.x, frame.pose.y))
        hit = error <= radius_m
        correct += hit
        if pose_published:
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
