"""Process settings: the thread caps reach faiss (in the calling thread), BLAS, torch and
ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: OpenMP settings are per thread and other tests leave theirs
# in this process's threads.
CAP_CHECK = """
import json, threading
import torch
from vpr_ros.runtime import set_num_threads, thread_limits

def limits_in_a_new_thread(num_threads):
    found = {}
    def work():
        set_num_threads(num_threads)
        found.update(thread_limits())
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return found

torch.set_num_threads(2)
print(json.dumps({
    'default': limits_in_a_new_thread(None),
    'capped': limits_in_a_new_thread(1),
    'after': limits_in_a_new_thread(None),
}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason='a cap of 1 needs 2 cores to show')
def test_the_cap_reaches_faiss_blas_and_torch_in_the_thread_that_searches() -> None:
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
    done = subprocess.run(
        [sys.executable, '-c', CAP_CHECK], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found['default']['faiss'] >= 2, found
    assert found['capped'] == {'faiss': 1, 'blas': 1, 'torch': 1}, found
    # faiss's OpenMP setting is per thread: a thread that did not cap keeps the default, so
    # the cap belongs in the worker thread that searches.
    assert found['after']['faiss'] == found['default']['faiss'], found


def test_onnxruntime_sessions_take_the_cap(tmp_path) -> None:
    from vpr_ros.extraction import OnnxExtractor
    from vpr_ros.models import load_model
    from vpr_ros.models.onnx_export import export_onnx

    path = export_onnx(load_model('selavpr_tiny_random'), tmp_path / 'tiny.onnx')
    extractor = OnnxExtractor(path, num_threads=1)
    assert extractor.session.get_session_options().intra_op_num_threads == 1
    assert extractor.thread_settings() == {'onnxruntime': 1}
