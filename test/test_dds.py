"""The shipped Fast DDS profile and the environments that use it."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from vpr_ros.dds import PROFILE_ENV, dds_environment, no_frames_hint, shipped_profile


def test_the_shipped_profile_gives_shared_memory_a_16_mb_segment() -> None:
    profile = shipped_profile()
    assert profile is not None and profile.name == 'fastdds.xml'
    namespace = {'dds': 'http://www.eprosima.com'}
    root = ElementTree.parse(profile).getroot()
    sizes = root.findall('.//dds:transport_descriptor/dds:segment_size', namespace)
    assert [int(size.text) for size in sizes] == [16 * 1024 * 1024]
    participant = root.find('.//dds:participant', namespace)
    assert participant is not None and participant.get('is_default_profile') == 'true'


def test_an_environment_gets_the_shipped_profile_unless_it_has_one() -> None:
    env, note = dds_environment({'PATH': '/bin'})
    assert env[PROFILE_ENV] == str(shipped_profile()) and 'large best-effort frames' in note
    env, note = dds_environment({PROFILE_ENV: '/etc/my_profile.xml'})
    assert env[PROFILE_ENV] == '/etc/my_profile.xml' and 'yours, kept' in note
    env, note = dds_environment({'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'})
    assert PROFILE_ENV not in env and 'no Fast DDS profile needed' in note


def test_the_no_frames_hint_names_the_cause_and_the_fix() -> None:
    hint = no_frames_hint('camera/image_raw')
    assert "'camera/image_raw'" in hint and 'best effort' in hint
    assert f'{PROFILE_ENV}={shipped_profile()}' in hint
