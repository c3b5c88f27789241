"""Settings: one idiom for every stage, and the one table each front end is made from.

Each stage's settings are a frozen dataclass derived from :class:`Conf`, whose fields are
declared with :func:`option`: type, default, help text, unit, range and allowed values in
one place. From that table come

* validation: a ``Conf`` checks every value when it is made (types, ranges, choices, NaN),
  and ``from_dict`` refuses unknown keys with the list of known ones;
* the command-line flags (:func:`add_arguments` / :func:`conf_from_args`);
* the ROS parameter descriptors of the nodes (``vpr_ros.nodes.params``), with their
  ranges and allowed values;
* the commented YAML parameter files in ``config/`` (:func:`yaml_lines`; a test checks
  that the shipped files say what the tables say).

Nested settings are fields whose type is another ``Conf`` (``RelocalizationConf.sequence``);
they flatten to dotted names (``sequence.length``) for ROS and to dashed flags
(``--sequence-length``) for the command line.

Model architectures are not stage settings: they are named registry entries
(``vpr_ros.models.CONFS``, plain dicts hashed into the model identity that maps record).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from vpr_ros.errors import ConfigError

C = TypeVar('C', bound='Conf')

SCALAR_TYPES = (bool, int, float, str)


class OptionSpec(NamedTuple):
    """One setting as every front end sees it.

    ``name`` is dotted for nested settings (``sequence.length``); ``kind`` is one of
    ``bool int float str`` or ``list[int] list[float] list[str]``.
    """

    name: str
    kind: str
    default: Any
    help: str
    unit: str = ''
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[Any, ...] = ()
    length: int | None = None
    read_only: bool = True
    cli: bool = True
    flag_name: str = ''

    @property
    def flag(self) -> str:
        """The command-line flag: ``sequence.length`` -> ``--sequence-length``."""
        if self.flag_name:
            return self.flag_name
        return '--' + self.name.replace('.', '-').replace('_', '-')

    def describe(self) -> str:
        """Help text with the unit, range and allowed values."""
        parts = [self.help.rstrip('.')]
        if self.unit:
            parts.append(f'unit: {self.unit}')
        if self.choices:
            parts.append('one of ' + ', '.join(repr(c) for c in self.choices))
        bounds = self.range_text()
        if bounds:
            parts.append(f'range {bounds}')
        return '; '.join(parts)

    def range_text(self) -> str:
        """``>= 1``, ``> 0``, ``<= 5`` or ``in [0, 1]`` (empty without bounds)."""
        low, high = self.min, self.max
        if low is not None and high is not None:
            return f'in {"(" if self.min_exclusive else "["}{low:g}, {high:g}]'
        if low is not None:
            return f'{">" if self.min_exclusive else ">="} {low:g}'
        if high is not None:
            return f'<= {high:g}'
        return ''


def option(
    default: Any,
    help: str,
    *,
    unit: str = '',
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    choices: Sequence[Any] = (),
    length: int | None = None,
    read_only: bool = True,
    cli: bool = True,
    flag: str = '',
) -> Any:
    """A ``Conf`` field: its default and everything a front end needs to present it.

    Args:
        default: the default value (lists are copied per instance).
        help: one sentence on what it does (units in ``unit``).
        unit: e.g. ``'m'``, ``'s'``, ``'deg'``, ``'Hz'``.
        min, max: inclusive bounds of a number, or of each element of a list of numbers.
        min_exclusive: ``min`` itself is not allowed.
        choices: allowed values (of a string, or of each element of a list of strings).
        length: exact length of a list.
        read_only: for ROS: fixed at start-up (False: may be changed at run time).
        cli: offered as a command-line flag.
        flag: the flag when not the dashed name (e.g. ``'--index'`` for ``index.type``).
    """
    metadata = {
        'help': help,
        'unit': unit,
        'min': min,
        'max': max,
        'min_exclusive': min_exclusive,
        'choices': tuple(choices),
        'length': length,
        'read_only': read_only,
        'cli': cli,
        'flag': flag,
    }
    if isinstance(default, list):
        frozen = tuple(default)
        return dataclasses.field(default_factory=lambda: list(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nested(conf_class: type[Conf], *, flatten: bool = False, default: Conf | None = None) -> Any:
    """A ``Conf`` field holding another stage's settings.

    Args:
        conf_class: the nested settings' class.
        flatten: its settings appear under their own names in flattened views (flags, ROS
            parameters, ``from_dict`` keys) instead of under ``<field>.``.
        default: the default settings here, when not the class defaults (e.g. a node that
            describes one frame at a time).
    """
    metadata = {'nested': True, 'flatten': flatten}
    instance = default if default is not None else conf_class()
    return dataclasses.field(default_factory=lambda: instance, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Conf:
    """Base of every stage's settings: validated when made, immutable, JSON-able."""

    section: ClassVar[str] = ''

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get('nested'):
                conf_class = hints[field.name]
                if isinstance(value, Mapping):
                    object.__setattr__(self, field.name, conf_class.from_dict(value))
                elif not isinstance(value, conf_class):
                    msg = f'{field.name} must be {conf_class.__name__} settings, got {value!r}'
                    raise ConfigError(msg)
                continue
            spec = _spec(field, hints[field.name], field.name)
            object.__setattr__(self, field.name, check_value(spec, value))
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses raise ``ConfigError`` with the fix."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None = None) -> C:
        """Settings from a mapping (nested mappings for nested settings, or dotted keys).

        Raises:
            ConfigError: an unknown key (the message lists the known ones) or a bad value.
        """
        data = dict(data or {})
        hints = _hints(cls)
        names = {f.name: f for f in dataclasses.fields(cls) if f.init}
        # Names of flattened nested settings -> the field that holds them.
        owners = {
            spec_name.partition('.')[0]: f.name
            for f in names.values()
            if f.metadata.get('flatten')
            for spec_name in hints[f.name].flat_names()
        }
        values: dict[str, Any] = {}
        nested_values: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            head, _, rest = str(key).partition('.')
            if head not in names and head in owners:
                nested_values.setdefault(owners[head], {})[str(key)] = value
                continue
            field = names.get(head)
            if field is None or (rest and not field.metadata.get('nested')):
                known = sorted({*names, *owners})
                msg = f'unknown {cls.__name__} setting {key!r}; known: {known}'
                raise ConfigError(msg)
            if rest:
                nested_values.setdefault(head, {})[rest] = value
            elif field.metadata.get('nested') and isinstance(value, Mapping):
                nested_values.setdefault(head, {}).update(value)
            else:
                values[head] = value
        for head, sub in nested_values.items():
            base = values.pop(head, None)
            base_dict = base.to_dict() if isinstance(base, Conf) else {}
            values[head] = hints[head].from_dict({**base_dict, **sub})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists stay lists), e.g. for JSON and manifests."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if isinstance(value, Conf) else _plain(value)
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with some settings changed (nested ones by dict or dotted keys)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def specs(cls, prefix: str = '') -> list[OptionSpec]:
        """Every setting, flattened (nested settings under ``<field>.`` unless declared
        ``flatten``), in field order, with this class's defaults."""
        hints = _hints(cls)
        out: list[OptionSpec] = []
        for field in dataclasses.fields(cls):
            name = prefix + field.name
            if field.metadata.get('nested'):
                sub_prefix = prefix if field.metadata.get('flatten') else name + '.'
                defaults = _field_default(field).flat(sub_prefix)
                out.extend(
                    spec._replace(default=defaults[spec.name])
                    for spec in hints[field.name].specs(sub_prefix)
                )
            else:
                out.append(_spec(field, hints[field.name], name))
        return out

    @classmethod
    def flat_names(cls) -> list[str]:
        """The flattened names of every setting (as in ``specs``)."""
        return [spec.name for spec in cls.specs()]

    def flat(self, prefix: str = '') -> dict[str, Any]:
        """Values by flattened name (as in ``specs``)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Conf):
                flatten = field.metadata.get('flatten')
                out.update(value.flat(prefix if flatten else prefix + field.name + '.'))
            else:
                out[prefix + field.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINT_CACHE:
        _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return _HINT_CACHE[cls]


def _kind(annotation: Any, name: str) -> str:
    if annotation in SCALAR_TYPES:
        return str(annotation.__name__)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and len(args) == 1 and args[0] in SCALAR_TYPES and args[0] is not bool:
        return f'list[{args[0].__name__}]'
    raise TypeError(f'setting {name!r}: unsupported type {annotation!r}')


def _field_default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _spec(field: dataclasses.Field[Any], annotation: Any, name: str) -> OptionSpec:
    meta = field.metadata
    default = _field_default(field)
    return OptionSpec(
        name=name,
        kind=_kind(annotation, name),
        default=default,
        help=meta.get('help', ''),
        unit=meta.get('unit', ''),
        min=meta.get('min'),
        max=meta.get('max'),
        min_exclusive=meta.get('min_exclusive', False),
        choices=meta.get('choices', ()),
        length=meta.get('length'),
        read_only=meta.get('read_only', True),
        cli=meta.get('cli', True),
        flag_name=meta.get('flag', ''),
    )


def check_value(spec: OptionSpec, value: Any) -> Any:
    """``value`` converted to the spec's type and checked against its range and choices.

    Integers are accepted where floats are expected; NaN and infinity never are.

    Raises:
        ConfigError: the value does not fit, with what is allowed.
    """
    if spec.kind.startswith('list['):
        element = spec.kind[5:-1]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f'{spec.name} must be a list of {element}, got {value!r}')
        if spec.length is not None and len(value) != spec.length:
            msg = f'{spec.name} must have {spec.length} values, got {len(value)}: {value!r}'
            raise ConfigError(msg)
        return [_check_scalar(spec, element, v) for v in value]
    return _check_scalar(spec, spec.kind, value)


def _check_scalar(spec: OptionSpec, kind: str, value: Any) -> Any:
    if kind == 'bool':
        if not isinstance(value, bool):
            raise ConfigError(f'{spec.name} must be true or false, got {value!r}')
        return value
    if kind == 'str':
        if not isinstance(value, str):
            raise ConfigError(f'{spec.name} must be a string, got {value!r}')
    elif kind in ('int', 'float'):
        number_types: tuple[type, ...] = (int,) if kind == 'int' else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            wanted = 'an integer' if kind == 'int' else 'a number'
            raise ConfigError(f'{spec.name} must be {wanted}, got {value!r}')
        if kind == 'float':
            value = float(typing.cast(float, value))
            if not math.isfinite(value):
                raise ConfigError(f'{spec.name} must be a finite number, got {value!r}')
        low_ok = spec.min is None or (
            value > spec.min if spec.min_exclusive else value >= spec.min
        )
        high_ok = spec.max is None or value <= spec.max
        if not (low_ok and high_ok):
            raise ConfigError(f'{spec.name} must be {spec.range_text()}, got {value!r}')
    if spec.choices and value not in spec.choices:
        raise ConfigError(f'{spec.name} must be one of {list(spec.choices)!r}, got {value!r}')
    return value


# -- command line ---------------------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    conf_class: type[Conf],
    *,
    exclude: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per setting of ``conf_class`` (dashed, dotted names joined by ``-``).

    Booleans become ``--x/--no-x``; lists take several values. Defaults show in ``--help``
    with ``argparse.ArgumentDefaultsHelpFormatter``.

    Args:
        parser: the parser or argument group.
        conf_class: the stage's settings.
        exclude: flattened names to leave out (set by other flags of the command).
        defaults: flattened name -> a default of this command that differs from the table.
        flags: flattened name -> the flag to use instead of the dashed name.
    """
    for spec in conf_class.specs():
        if not spec.cli or spec.name in exclude:
            continue
        default = (defaults or {}).get(spec.name, spec.default)
        dest = spec.name.replace('.', '__')
        kwargs: dict[str, Any] = {'dest': dest, 'default': default, 'help': spec.describe()}
        if spec.kind == 'bool':
            kwargs['action'] = argparse.BooleanOptionalAction
        elif spec.kind.startswith('list['):
            kwargs['type'] = _PARSERS[spec.kind[5:-1]]
            kwargs['nargs'] = spec.length or '+'
            kwargs['metavar'] = spec.kind[5:-1].upper()
        else:
            kwargs['type'] = _PARSERS[spec.kind]
            if spec.choices:
                kwargs['choices'] = spec.choices
            else:
                kwargs['metavar'] = spec.kind.upper()
        parser.add_argument((flags or {}).get(spec.name, spec.flag), **kwargs)


_PARSERS: dict[str, Any] = {'int': int, 'float': float, 'str': str}


def conf_from_args(conf_class: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """The settings that ``add_arguments`` flags parsed into ``args`` (plus ``overrides``)."""
    values: dict[str, Any] = {}
    for spec in conf_class.specs():
        dest = spec.name.replace('.', '__')
        if hasattr(args, dest):
            values[spec.name] = getattr(args, dest)
    values.update(overrides)
    return conf_class.from_dict(values)


# -- YAML parameter files -------------------------------------------------------------------


def yaml_lines(
    specs: Sequence[OptionSpec], values: Mapping[str, Any] | None = None
) -> Iterator[str]:
    """Commented YAML ``key: value`` lines for ``specs`` (nested names as nested maps),
    indented for a ``ros__parameters`` block."""
    values = values or {}
    open_sections: list[str] = []
    for spec in specs:
        *sections, key = spec.name.split('.')
        common = 0
        while (
            common < min(len(sections), len(open_sections))
            and sections[common] == open_sections[common]
        ):
            common += 1
        open_sections = open_sections[:common]
        for section in sections[common:]:
            yield '    ' + '  ' * len(open_sections) + f'{section}:'
            open_sections.append(section)
        indent = '    ' + '  ' * len(sections)
        for line in _wrap(spec.describe(), 95 - len(indent)):
            yield f'{indent}# {line}'
        value = values.get(spec.name, spec.default)
        yield f'{indent}{key}: {yaml_scalar(value)}'


def yaml_scalar(value: Any) -> str:
    """A value as YAML flow text (strings quoted, so '1.0' stays a string)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(yaml_scalar(v) for v in value) + ']'
    return str(value)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(width, 20)) or ['']
