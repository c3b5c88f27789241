"""A map built with a (small, random-initialised) SelaVPR model answers through the node."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import synthetic_place

from vpr_ros.mapping import MapBuilder
from vpr_ros.models import load_model
from vpr_ros.types import Frame, Pose

rclpy = pytest.importorskip('rclpy')
from test_relocalize_node import next_stamp, node_in_this_process, raw_msg  # noqa: E402

from vpr_ros.nodes.conversions import hypotheses_from_cloud  # noqa: E402

pytestmark = [pytest.mark.ros]
PLACES = 6


def test_selavpr_map_answers_through_the_relocalize_node(tmp_path: Path) -> None:
    model = load_model('selavpr_tiny_random')
    builder = MapBuilder(model, {'keyframes': {'min_distance_m': 0.0}})
    for i in range(PLACES):
        builder.offer(Frame(synthetic_place(i), i, pose=Pose(10.0 * i, 0.0, 0.0)))
    builder.save(tmp_path / 'selavpr_map')

    params = {
        'map_dir': str(tmp_path / 'selavpr_map'),  # the model comes from the map's manifest
        'camera_topics': ['cam/raw'],
        'camera_qos': 'reliable',
        'top_k': 4,
        'rerank_k': 3,
        'mode': 'single',  # one frame per place, each answered on its own
        'confidence_threshold': 0.3,
        'max_rate_hz': 0.0,
        'num_threads': 1,
    }
    with node_in_this_process(params) as harness:
        for place in (1, 4):
            cloud = harness.ask(harness.raw, raw_msg(synthetic_place(place), next_stamp()))
            hypotheses = hypotheses_from_cloud(cloud)
            assert len(hypotheses) == 3
            # The very image of a place: the untrained model still finds it first.
            assert hypotheses[0].place_id == place
            assert hypotheses[0].pose == Pose(10.0 * place, 0.0, 0.0)
            # Local features are stored as float16: near-ties may flip a few matches.
            assert hypotheses[0].rerank_score > 0.95 > hypotheses[1].rerank_score
