"""Process settings: the thread caps reach faiss (in the calling thread), BLAS, torch and
ONNX Runtime."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from vpr_ros.runtime import set_num_threads, thread_limits


def limits_in_a_new_thread(num_threads: int | None) -> dict[str, int]:
    found: dict[str, int] = {}

    def work() -> None:
        set_num_threads(num_threads)
        found.update(thread_limits())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return found


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason='a cap of 1 needs 2 cores to show')
def test_the_cap_reaches_faiss_blas_and_torch_in_the_thread_that_searches() -> None:
    torch.set_num_threads(2)
    try:
        # A thread that never set a cap has OpenMP's default (whatever this test process's
        # own thread was set to by earlier tests).
        default = limits_in_a_new_thread(None)['faiss']
        if default < 2:
            pytest.skip('OpenMP defaults to one thread here (OMP_NUM_THREADS=1?)')
        capped = limits_in_a_new_thread(1)
        assert capped['faiss'] == 1
        assert capped['blas'] == 1
        assert capped['torch'] == 1
        # OpenMP settings are per thread (faiss's, and torch's in its OpenMP build): a thread
        # that did not cap keeps the default, so the cap belongs in the worker thread.
        assert limits_in_a_new_thread(None)['faiss'] == default
    finally:
        torch.set_num_threads(1)
        set_num_threads(os.cpu_count())  # BLAS's cap is process-wide: give it back


def test_onnxruntime_sessions_take_the_cap(tmp_path) -> None:
    from vpr_ros.extraction import OnnxExtractor
    from vpr_ros.models import load_model
    from vpr_ros.models.onnx_export import export_onnx

    path = export_onnx(load_model('selavpr_tiny_random'), tmp_path / 'tiny.onnx')
    extractor = OnnxExtractor(path, num_threads=1)
    assert extractor.session.get_session_options().intra_op_num_threads == 1
    assert extractor.thread_settings() == {'onnxruntime': 1}
