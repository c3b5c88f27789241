"""The settings idiom: validation, nesting, flattening, command-line flags and YAML text."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
import yaml

from vpr_ros.config import Conf, add_arguments, conf_from_args, nested, option, yaml_lines
from vpr_ros.errors import ConfigError


@dataclass(frozen=True)
class Inner(Conf):
    size: list[int] = option([64, 32], 'An image size', unit='px', min=1, length=2)
    mode: str = option('a', 'A mode', choices=('a', 'b'))


@dataclass(frozen=True)
class Outer(Conf):
    radius_m: float = option(10.0, 'A radius', unit='m', min=0.0)
    count: int = option(3, 'A count', min=1, max=9)
    strict: bool = option(True, 'A switch')
    inner: Inner = nested(Inner)
    shared: Inner = nested(Inner, flatten=True, default=Inner(mode='b'))


def test_defaults_are_valid_and_round_trip_through_dicts() -> None:
    conf = Outer()
    assert Outer.from_dict(conf.to_dict()) == conf
    assert conf.shared.mode == 'b' and conf.inner.mode == 'a'


@pytest.mark.parametrize(
    ('values', 'message'),
    [
        ({'radius_m': -1.0}, 'radius_m must be >= 0'),
        ({'radius_m': float('nan')}, 'radius_m must be a finite number'),
        ({'radius_m': 'far'}, 'radius_m must be a number'),
        ({'count': 0}, r'count must be in \[1, 9\]'),
        ({'count': 2.5}, 'count must be an integer'),
        ({'count': True}, 'count must be an integer'),
        ({'strict': 1}, 'strict must be true or false'),
        ({'inner': {'size': [1]}}, 'size must have 2 values'),
        ({'inner.mode': 'c'}, r"mode must be one of \['a', 'b'\]"),
        ({'radius': 1.0}, "unknown Outer setting 'radius'; known: .*radius_m"),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Outer.from_dict(values)


def test_integers_are_taken_where_numbers_are_expected() -> None:
    assert Outer.from_dict({'radius_m': 3}).radius_m == 3.0


def test_nested_settings_take_dicts_dotted_keys_and_flattened_names() -> None:
    conf = Outer.from_dict({'inner': {'mode': 'b'}, 'inner.size': [8, 8], 'mode': 'a'})
    assert conf.inner == Inner(size=[8, 8], mode='b')
    assert conf.shared.mode == 'a'  # flattened: its settings go by their own names
    assert conf.replace(count=4).count == 4 and conf.replace(count=4).inner == conf.inner


def test_specs_flatten_nested_settings_with_this_classes_defaults() -> None:
    specs = {spec.name: spec for spec in Outer.specs()}
    assert list(specs) == [
        'radius_m',
        'count',
        'strict',
        'inner.size',
        'inner.mode',
        'size',
        'mode',
    ]
    assert specs['mode'].default == 'b' and specs['inner.mode'].default == 'a'
    assert specs['radius_m'].describe() == 'A radius; unit: m; range >= 0'
    assert Outer().flat()['inner.size'] == [64, 32]


def test_command_line_flags_come_from_the_table() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Outer, flags={'count': '-n'})
    args = parser.parse_args(
        ['--radius-m', '2.5', '-n', '5', '--no-strict', '--inner-size', '4', '4']
    )
    conf = conf_from_args(Outer, args)
    assert conf.radius_m == 2.5 and conf.count == 5 and conf.strict is False
    assert conf.inner.size == [4, 4] and conf.shared.mode == 'b'
    with pytest.raises(SystemExit):
        parser.parse_args(['--inner-mode', 'c'])  # choices are enforced by argparse too


def test_yaml_lines_render_every_setting_with_its_description() -> None:
    text = '\n'.join(yaml_lines(Outer.specs()))
    parsed = yaml.safe_load('root:\n' + text)['root']
    assert parsed['radius_m'] == 10.0 and parsed['inner'] == {'size': [64, 32], 'mode': 'a'}
    assert parsed['mode'] == 'b'
    assert '# A radius; unit: m; range >= 0' in text
