"""Soak: the relocalize node fed 640x480 frames at 30 Hz for 10 minutes, with map rebuilds
and reloads every 30 s and malformed frames mixed in.

    .venv/bin/python benchmarks/soak.py [--duration-s 600] [--rate-hz 30] [--reload-every-s 30]
        [--bad-every 10] [--places 50] [--num-threads 1]

The node runs as its own process with the shipped parameters (``config/relocalize.yaml``:
``camera_qos`` sensor_data, ``max_rate_hz`` 10) and two cameras: raw 640x480 rgb8 frames,
published best effort at ``--rate-hz``, and a compressed one. Every ``--bad-every``-th frame
is malformed, in turn: an unknown encoding, a wrong step, truncated data, a corrupt JPEG and
a PNG that would decode to 48 MP. Every ``--reload-every-s`` the map is rebuilt in place (a
new generation, alternating two maps with different place ids) and ``~/reload_map`` swaps it
in while frames keep coming.

Prints: the node's RSS after warm-up and at the end (growth), the answered rate (hypotheses
per second, and the share of good frames answered; the node processes at most
``max_rate_hz`` and always the newest frame), end-to-end latency (publish -> hypotheses
received) median and p95, the node's own latency p95, reloads, skipped and dropped frames.

Not a test. Uses the shipped Fast DDS profile (unless FASTDDS_DEFAULT_PROFILES_FILE is set),
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a domain id of its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from node_latency import build_map, query_image

from vpr_ros.database import PlaceDatabase
from vpr_ros.dds import dds_environment, use_shipped_profile
from vpr_ros.images import rgb_to_compressed_bytes, rgb_to_image_fields
from vpr_ros.models import DEFAULT_MODEL
from vpr_ros.nodes.conversions import hypotheses_from_cloud, stamp_ns

ROOT = Path(__file__).resolve().parents[1]
B_OFFSET = 1000  # place ids of the second map


def rss_mb(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return float('nan')


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG that decodes to width x height grey pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('--duration-s', type=float, default=600.0)
    parser.add_argument('--rate-hz', type=float, default=30.0, help='camera frame rate')
    parser.add_argument('--reload-every-s', type=float, default=30.0)
    parser.add_argument('--bad-every', type=int, default=10, help='every n-th frame is malformed')
    parser.add_argument('--places', type=int, default=50)
    parser.add_argument('--num-threads', type=int, default=1, help='torch threads of the node')
    parser.add_argument('--warm-up-s', type=float, default=30.0, help='before the RSS baseline')
    args = parser.parse_args(argv)
    print(use_shipped_profile())  # this process publishes 640x480 frames best effort

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image, PointCloud2
    from std_srvs.srv import Trigger

    domain_id = int(os.environ.get('ROS_DOMAIN_ID') or 1 + os.getpid() % 100)
    with tempfile.TemporaryDirectory() as tmp:
        map_dir, map_b = Path(tmp) / 'map', Path(tmp) / 'b'
        build_map(map_dir, DEFAULT_MODEL, args.places, args.num_threads)
        map_a = PlaceDatabase.load(map_dir)
        places = map_a.places.copy()
        places['place_id'] += B_OFFSET
        PlaceDatabase(
            map_a.model,
            map_a.global_descriptors,
            places,
            map_a.local_features,
            strings=map_a.strings,
        ).save(map_b)
        maps = [map_a, PlaceDatabase.load(map_b)]

        env = dict(
            dds_environment()[0],
            ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
            ROS_DOMAIN_ID=str(domain_id),
            PYTHONUNBUFFERED='1',
        )
        command = [sys.executable, '-m', 'vpr_ros.nodes.relocalize_node', '--ros-args']
        command += ['--params-file', str(ROOT / 'config' / 'relocalize.yaml')]
        for name, value in [
            ('map_dir', str(map_dir)),
            ('num_threads', str(args.num_threads)),
            ('camera_topics', '[image, image_compressed]'),
            ('camera_transports', '[raw, compressed]'),
        ]:
            command += ['-p', f'{name}:={value}']
        log = Path(tmp) / 'node.log'
        with log.open('w') as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

        context = rclpy.Context()
        rclpy.init(context=context, domain_id=domain_id)
        node = rclpy.create_node('soak', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        sent: dict[int, float] = {}
        latencies: list[float] = []
        answered = correct = 0
        diagnostics: dict[str, str] = {}

        def on_cloud(msg: PointCloud2) -> None:
            nonlocal answered, correct
            stamp = stamp_ns(msg.header.stamp)
            if stamp in sent:
                latencies.append(time.perf_counter() - sent.pop(stamp))
                answered += 1
                hypotheses = hypotheses_from_cloud(msg)
                index = (stamp // 1000) % args.places  # the stamp carries the place
                correct += bool(hypotheses) and hypotheses[0].place_id % B_OFFSET == index

        def on_status(msg) -> None:  # noqa: ANN001 (DiagnosticArray)
            for status in msg.status:
                if status.name.startswith('relocalize'):
                    diagnostics.update({kv.key: kv.value for kv in status.values})

        from diagnostic_msgs.msg import DiagnosticArray

        node.create_subscription(PointCloud2, 'relocalize/hypotheses', on_cloud, 50)
        node.create_subscription(DiagnosticArray, '/diagnostics', on_status, 10)
        raw = node.create_publisher(Image, 'image', qos_profile_sensor_data)
        compressed = node.create_publisher(
            CompressedImage, 'image_compressed', qos_profile_sensor_data
        )
        reload = node.create_client(Trigger, 'relocalize/reload_map')

        def spin_until(predicate, timeout: float) -> bool:  # noqa: ANN001
            deadline = time.monotonic() + timeout
            while not predicate() and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.01)
            return bool(predicate())

        if not spin_until(lambda: raw.get_subscription_count() > 0 and diagnostics, 180):
            print(log.read_text()[-3000:], file=sys.stderr)
            raise SystemExit('the node did not come up')

        good = []
        for i in range(args.places):
            encoding, height, width, step, data = rgb_to_image_fields(query_image(i))
            good.append(Image(encoding=encoding, height=height, width=width, step=step, data=data))
        jpeg = rgb_to_compressed_bytes(query_image(0))
        bad_kinds = [
            'unknown encoding',
            'wrong step',
            'truncated data',
            'corrupt jpeg',
            'png bomb',
        ]
        bomb = png_bomb(8000, 6000)

        def bad_frame(kind: str):  # noqa: ANN202
            if kind in ('corrupt jpeg', 'png bomb'):
                msg = CompressedImage(format='jpeg' if kind == 'corrupt jpeg' else 'png')
                msg.data = (jpeg[:300] + bytes(2000)) if kind == 'corrupt jpeg' else bomb
                return compressed, msg
            encoding, height, width, step, data = rgb_to_image_fields(query_image(1))
            msg = Image(encoding=encoding, height=height, width=width, step=step, data=data)
            if kind == 'unknown encoding':
                msg.encoding = 'bayer_rggb8'
            elif kind == 'wrong step':
                msg.step = width
            else:
                msg.data = data[: len(data) // 2]
            return raw, msg

        period = 1.0 / args.rate_hz
        start = time.monotonic()
        next_reload = start + args.reload_every_s
        rss: list[tuple[float, float]] = []
        next_rss = start
        reloads_ok = reloads_failed = 0
        pending_reload = None
        frames = bad = 0
        current_map = 0
        while time.monotonic() - start < args.duration_s:
            now = time.monotonic()
            if now >= next_rss:
                rss.append((now - start, rss_mb(process.pid)))
                next_rss += 5.0
            if now >= next_reload and pending_reload is None:
                current_map = 1 - current_map
                maps[current_map].save(map_dir)  # rebuilt in place: a new generation
                pending_reload = reload.call_async(Trigger.Request())
                next_reload += args.reload_every_s
            if pending_reload is not None and pending_reload.done():
                result = pending_reload.result()
                reloads_ok += bool(result and result.success)
                reloads_failed += not (result and result.success)
                pending_reload = None
            if frames % args.bad_every == args.bad_every - 1:
                publisher, msg = bad_frame(bad_kinds[bad % len(bad_kinds)])
                bad += 1
            else:
                publisher, msg = raw, good[frames % args.places]
            stamp = (10_000 + frames) * 10**9 + (frames % args.places) * 1000
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
            if publisher is raw and msg in good:
                sent[stamp] = time.perf_counter()
            publisher.publish(msg)
            frames += 1
            deadline = start + frames * period
            while time.monotonic() < deadline:
                executor.spin_once(timeout_sec=max(0.0, min(0.005, deadline - time.monotonic())))
            if len(sent) > 1000:  # frames the node dropped (it keeps the newest) never answer
                for key in sorted(sent)[:-1000]:
                    del sent[key]
        spin_until(lambda: False, 2.0)
        elapsed = time.monotonic() - start
        rss.append((elapsed, rss_mb(process.pid)))
        alive = process.poll() is None
        rclpy.shutdown(context=context)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        output = log.read_text()

    baseline = [mb for t, mb in rss if args.warm_up_s <= t < args.warm_up_s + 30] or [rss[0][1]]
    final = [mb for t, mb in rss if t >= elapsed - 30]
    latency_ms = np.asarray(latencies) * 1e3
    good_frames = frames - bad
    print(
        f'soak: {elapsed:.0f} s, {frames} frames at {args.rate_hz:g} Hz (640x480 rgb8 best '
        f'effort; {bad} malformed), {args.places} places, node torch threads '
        f'{args.num_threads}, cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}'
    )
    growth = np.median(final) - np.median(baseline)
    print(
        f'RSS: {np.median(baseline):.0f} MB after {args.warm_up_s:.0f} s warm-up, '
        f'{np.median(final):.0f} MB at the end, growth {growth:+.0f} MB '
        f'(max {max(mb for _, mb in rss):.0f} MB)'
    )
    print(
        f'answered: {answered} frames = {answered / elapsed:.1f} Hz ({answered / good_frames:.0%} '
        f'of {good_frames} good frames; the node takes the newest frame, at most max_rate_hz); '
        f'top-1 correct {correct}/{answered}'
    )
    print(
        f'end-to-end latency (publish -> hypotheses): median {np.median(latency_ms):.0f} ms, '
        f"p95 {np.percentile(latency_ms, 95):.0f} ms; the node's own p95 "
        f'{diagnostics.get("latency_p95_ms", "?")} ms'
    )
    counters = ', '.join(
        f'{name} {diagnostics.get(f"frames_{name}")}'
        for name in ('received', 'processed', 'dropped', 'skipped', 'lost_in_transport')
    )
    print(
        f'reloads: {reloads_ok} ok, {reloads_failed} failed; node counters: {counters} '
        f'(skipped: {diagnostics.get("skipped_reasons")})'
    )
    print(
        f'node alive at the end: {alive}; tracebacks in its log: {output.count("Traceback")}; '
        f'exit code {process.returncode}'
    )
    return 0 if alive and 'Traceback' not in output else 1


if __name__ == '__main__':
    sys.exit(main())
