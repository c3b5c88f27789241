"""Faults of build_map: crashes during --append, concurrent appends, bad --out targets
(checked before any frame is read), oversized images, damaged bags."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_place
from test_map_faults import SimulatedCrash, crash_at, leftovers

from vpr_ros.bagwriter import write_bag
from vpr_ros.cli.build_map import main as build_map_main
from vpr_ros.database import LOCK_FILE, PlaceDatabase
from vpr_ros.errors import BagReadError
from vpr_ros.mapping import MapBuilder, build_map
from vpr_ros.types import Frame, Pose

REPO = Path(__file__).resolve().parents[2]
TOPICS = ('/camera/image_raw', '/odom')


def route(count: int, start_ns: int = 10**9, size: tuple[int, int] = (60, 80)) -> list[Frame]:
    """Frames 1.2 m apart: each one a keyframe."""
    return [
        Frame(synthetic_place(i, size), start_ns + i * 10**8, pose=Pose(1.2 * i, 0.0, 0.0))
        for i in range(count)
    ]


def test_a_crash_before_any_step_of_an_append_leaves_the_old_or_the_new_map(
    tmp_path: Path, default_model
) -> None:
    first = write_bag(tmp_path / 'first', route(3))
    second = write_bag(tmp_path / 'second', route(2, start_ns=9 * 10**9))
    build_map(default_model, [first], *TOPICS, tmp_path / 'probe', progress=False)
    with crash_at(None) as steps:
        build_map(
            default_model, [second], *TOPICS, tmp_path / 'probe', append=True, progress=False
        )
    assert 'swap pointer' in steps
    for step, name in enumerate(steps):
        out = tmp_path / f'map{step}'
        build_map(default_model, [first], *TOPICS, out, progress=False)
        with crash_at(step), pytest.raises(SimulatedCrash):
            build_map(default_model, [second], *TOPICS, out, append=True, progress=False)
        assert len(PlaceDatabase.load(out)) in (3, 5), name
        assert leftovers(out) == [], (name, leftovers(out))


def cli_env() -> dict[str, str]:
    return {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}


def start_build_map(bag: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, '-m', 'vpr_ros.cli.build_map', '--bag', str(bag)]
    command += ['--image-topic', TOPICS[0], '--pose-topic', TOPICS[1], '--out', str(out)]
    command += ['--append', '--no-progress', '--threads', '1', *extra]
    return subprocess.Popen(
        command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_concurrent_appends_lose_no_places(tmp_path: Path, default_model) -> None:
    base = write_bag(tmp_path / 'base', route(4))
    bags = [
        write_bag(tmp_path / f'run{i}', route(6, start_ns=(10 + 5 * i) * 10**9)) for i in (1, 2)
    ]
    out = tmp_path / 'map'
    build_map(default_model, [base], *TOPICS, out, progress=False)
    first = start_build_map(bags[0], out, '--lock-timeout-s', '300')
    deadline = time.monotonic() + 60
    while (out / LOCK_FILE).read_text().strip() != str(first.pid):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.02)
    second = start_build_map(bags[1], out, '--lock-timeout-s', '300')  # waits for the first
    impatient = start_build_map(bags[1], out)  # does not wait: refused, nothing lost
    _, impatient_err = impatient.communicate(timeout=120)
    assert impatient.returncode == 1
    assert f'being written by PID {first.pid}' in impatient_err
    assert 'Traceback' not in impatient_err
    for process in (first, second):
        out_text, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert 'map written to' in out_text
    database = PlaceDatabase.load(out)
    assert len(database) == 4 + 6 + 6
    assert sorted(set(database.places['traverse'])) == [0, 1, 2]


@contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (needs root, as on CI; skipped elsewhere)."""
    path.mkdir()
    options = f'size={size}' + (',ro' if read_only else '')
    mounted = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)


def fill(directory: Path, leave_bytes: int) -> None:
    """Fill a small file system up to ``leave_bytes`` free."""
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with (directory / 'ballast').open('wb') as stream:
        stream.write(bytes(max(free - leave_bytes, 0)))


def run_cli(tmp_path: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    bag = tmp_path / 'bag'
    if not bag.exists():
        write_bag(bag, route(3))
    argv = ['--bag', str(bag), '--image-topic', TOPICS[0], '--pose-topic', TOPICS[1]]
    code = build_map_main([*argv, '--out', str(out), '--no-progress', *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ('case', 'expected'),
    [
        ('file', 'is a file; pass a directory'),
        ('under_file', 'is under the file'),
        ('symlink', 'is a symlink'),
        ('not_a_map', 'is not a vpr_ros map'),
        ('read_only', 'Read-only file system; choose a writable map directory'),
        ('full', 'No space left on device; free some space'),
    ],
)
def test_a_bad_out_is_refused_in_one_line_before_the_model_loads(
    tmp_path: Path, capsys, case: str, expected: str
) -> None:
    out = tmp_path / 'map'
    if case == 'file':
        out.write_text('x')
    elif case == 'under_file':
        (tmp_path / 'notes.txt').write_text('x')
        out = tmp_path / 'notes.txt' / 'map'
    elif case == 'symlink':
        (tmp_path / 'real').mkdir()
        out.symlink_to(tmp_path / 'real')
    elif case == 'not_a_map':
        out.mkdir()
        (out / 'holiday.jpg').write_bytes(b'x')
    stack = contextmanager(lambda: (yield))()
    if case == 'read_only':
        stack = tmpfs(tmp_path / 'ro', '1m', read_only=True)
        out = tmp_path / 'ro' / 'map'
    elif case == 'full':
        stack = tmpfs(tmp_path / 'full', '1m')
        out = tmp_path / 'full' / 'map'
    with stack:
        if case == 'full':
            fill(tmp_path / 'full', 0)
        # A model that does not exist: the --out error must come first.
        code, err = run_cli(tmp_path, out, capsys, '--model', str(tmp_path / 'no_model'))
    assert code == 1
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert expected in err and str(out) in err


def test_a_disk_that_fills_up_during_the_save_gives_one_line_and_keeps_the_old_map(
    tmp_path: Path, capsys
) -> None:
    with tmpfs(tmp_path / 'disk', '2m') as disk:
        out = disk / 'map'
        code, err = run_cli(tmp_path, out, capsys)
        assert code == 0, err
        fill(disk, 150_000)  # room for the probe, not for a map of 8 places
        write_bag(tmp_path / 'longer', route(8, start_ns=20 * 10**9))
        argv = ['--bag', str(tmp_path / 'longer'), '--image-topic', TOPICS[0]]
        argv += ['--pose-topic', TOPICS[1], '--out', str(out), '--no-progress', '--append']
        code = build_map_main(argv)
        err = capsys.readouterr().err
        assert code == 1
        assert 'No space left on device' in err and 'free some space' in err, err
        assert err.count('\n') == 1, err
        assert len(PlaceDatabase.load(out)) == 3
        (disk / 'ballast').unlink()
        assert leftovers(out) == []


def png_bomb(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` black pixels: tiny, huge once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')
    )


def test_an_image_over_the_pixel_cap_is_refused_before_decoding_and_counted(
    tmp_path: Path, default_model, capsys
) -> None:
    from rosbags.typesys import Stores, get_typestore

    frames = route(3)
    bag = write_bag(tmp_path / 'bag', frames, compressed=True, compressed_format='png')
    # One more message: a PNG of 8000 x 6000 = 48 MP in a few kB.
    bomb = png_bomb(8000, 6000)
    assert len(bomb) < 100_000
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    from rosbags.rosbag2 import Reader, Writer

    rebuilt = tmp_path / 'with_bomb'
    with Reader(bag) as reader, Writer(rebuilt, version=Writer.VERSION_LATEST) as writer:
        connections = {
            c.id: writer.add_connection(c.topic, c.msgtype, typestore=typestore)
            for c in reader.connections
        }
        for connection, stamp, raw in reader.messages():
            writer.write(connections[connection.id], stamp, raw)
            if connection.topic == TOPICS[0] and stamp == frames[1].stamp_ns:
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                msg.data = np.frombuffer(bomb, np.uint8)
                out = typestore.serialize_cdr(msg, connection.msgtype)
                writer.write(connections[connection.id], stamp + 1, out)
    argv = ['--bag', str(rebuilt), '--image-topic', TOPICS[0], '--pose-topic', TOPICS[1]]
    started = time.perf_counter()
    code = build_map_main([*argv, '--out', str(tmp_path / 'map'), '--no-progress'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert 'frames refused:     1 (more pixels than --max-image-pixels)' in captured.out
    assert '1 image too large' in captured.out
    assert len(PlaceDatabase.load(tmp_path / 'map')) == 3
    assert time.perf_counter() - started < 60
    # With a cap above it, the frame is decoded (it is no keyframe: 1 ns after another).
    argv += ['--max-image-pixels', '50000000', '--out', str(tmp_path / 'map2'), '--no-progress']
    assert build_map_main(argv) == 0
    assert 'frames refused:     0' in capsys.readouterr().out


def test_keyframes_wait_for_their_batch_at_the_model_input_size(default_model) -> None:
    builder = MapBuilder(default_model, {'batch_size': 8})
    for frame in route(3, size=(1200, 1600)):
        assert builder.offer(frame)
    height, width = default_model.preprocessing.size
    assert [f.image.shape for f, _, _ in builder._pending] == [(height, width, 3)] * 3
    builder.flush()
    assert len(builder.database) == 3
    # The sequence descriptors are made from the full images, as at query time.
    from vpr_ros.sequence import patch_normalised_descriptor

    expected = patch_normalised_descriptor([route(3, size=(1200, 1600))[2].image])[0]
    stored = builder.database.sequence_descriptors[2]  # 6 bits a value: the same direction
    assert float(stored @ expected) > 0.995


def test_a_bag_whose_frames_all_fail_to_decode_does_not_blame_the_pose_topic(
    tmp_path: Path, default_model
) -> None:
    bag = write_bag(tmp_path / 'bag', route(3), encoding='mono16')
    from vpr_ros.bagio import read_frames

    assert len(list(read_frames([bag], *TOPICS))) == 3  # mono16 is fine; now break it:
    broken = write_bag(tmp_path / 'broken', route(3), compressed=True)
    from rosbags.rosbag2 import Reader, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    rebuilt = tmp_path / 'undecodable'
    with Reader(broken) as reader, Writer(rebuilt, version=Writer.VERSION_LATEST) as writer:
        connections = {
            c.id: writer.add_connection(c.topic, c.msgtype, typestore=typestore)
            for c in reader.connections
        }
        for connection, stamp, raw in reader.messages():
            if connection.topic == TOPICS[0]:
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                msg.data = np.frombuffer(bytes(500), np.uint8)
                raw = typestore.serialize_cdr(msg, connection.msgtype)
            writer.write(connections[connection.id], stamp, raw)
    with pytest.raises(BagReadError) as error:
        build_map(default_model, [rebuilt], *TOPICS, tmp_path / 'map', progress=False)
    assert 'could not be decoded (corrupt compressed image)' in str(error.value)
    assert '--pose-topic' not in str(error.value)


def add_chunk_crcs(mcap: Path) -> None:
    """Write the CRC of every chunk, as ros2 bag's mcap writer does (rosbags writes 0)."""
    data = bytearray(mcap.read_bytes())
    position = 8  # magic
    while position < len(data):
        opcode = data[position]
        (length,) = struct.unpack_from('<Q', data, position + 1)
        content = position + 9
        if opcode == 0x06:
            uncompressed_size, _ = struct.unpack_from('<QI', data, content + 16)
            (name_length,) = struct.unpack_from('<I', data, content + 28)
            assert name_length == 0, 'the chunks must be uncompressed'
            (size,) = struct.unpack_from('<Q', data, content + 32)
            records = bytes(data[content + 40 : content + 40 + size])
            assert size == uncompressed_size
            struct.pack_into('<I', data, content + 24, zlib.crc32(records))
        if opcode == 0x0F:  # data end
            break
        position = content + length
    mcap.write_bytes(bytes(data))


def test_a_flipped_byte_in_an_mcap_chunk_with_a_checksum_is_a_clear_error(
    tmp_path: Path, default_model
) -> None:
    frames = route(4)
    bag = write_bag(tmp_path / 'bag', frames, storage='mcap')
    mcap = next(bag.glob('*.mcap'))
    add_chunk_crcs(mcap)
    assert len(list(__import__('vpr_ros.bagio').bagio.read_frames([bag], *TOPICS))) == 4
    data = bytearray(mcap.read_bytes())
    data[data.index(frames[2].image.tobytes()[:64]) + 10] ^= 0xFF
    mcap.write_bytes(bytes(data))
    with pytest.raises(BagReadError, match='corrupt or truncated: ReaderError: Chunk checksum'):
        build_map(default_model, [bag], *TOPICS, tmp_path / 'map', progress=False)
    assert not (tmp_path / 'map').exists()


@pytest.mark.parametrize(
    ('flag', 'value', 'expected'),
    [
        ('--max-pose-gap-s', 'nan', 'max_pose_gap_s must be a finite number'),
        ('--min-distance-m', '-1', 'min_distance_m must be >= 0'),
        ('--max-image-pixels', '0', 'max_image_pixels must be >= 1'),
    ],
)
def test_a_bad_option_value_is_one_line_and_exit_code_1(
    tmp_path: Path, capsys, flag: str, value: str, expected: str
) -> None:
    code, err = run_cli(tmp_path, tmp_path / 'map', capsys, flag, value)
    assert code == 1
    assert err.startswith('error: ') and expected in err and err.count('\n') == 1, err
    assert not (tmp_path / 'map').exists()
