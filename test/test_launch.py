"""The launch file and parameters file agree with setup.py and the node's parameters.

``launch`` and ``launch_ros`` are not installable here, so the launch file is read as source
(its calls and literals); where launch_ros is importable the description is built as well.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest
import yaml

from vpr_ros.nodes.params import shipped_params_files
from vpr_ros.nodes.relocalize_node import NODE_NAME, RelocalizeNodeConf

SPECS = {spec.name: spec for spec in RelocalizeNodeConf.specs()}

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'relocalize.launch.py'
CONFIG_FILE = ROOT / 'config' / 'relocalize.yaml'


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Every call of function ``name`` in ``tree``."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, 'id', None) == name or getattr(node.func, 'attr', None) == name)
    ]


def keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg}


def literal(node: ast.expr) -> object:
    return ast.literal_eval(node)


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts, name -> 'module:function'."""
    tree = ast.parse((ROOT / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == 'console_scripts':
                    entries = [e.split('=') for e in literal(value)]
                    return {name.strip(): target.strip() for name, target in entries}
    raise AssertionError('setup.py declares no console_scripts')


def launch_node_call(package: str = 'vpr_ros') -> ast.Call:
    nodes = calls(ast.parse(LAUNCH_FILE.read_text()), 'Node')
    ours = [n for n in nodes if literal(keywords(n)['package']) == package]
    assert len(ours) == 1, f'the launch file should start exactly one {package} node'
    return ours[0]


def launch_arguments() -> dict[str, dict[str, ast.expr]]:
    tree = ast.parse(LAUNCH_FILE.read_text())
    return {literal(c.args[0]): keywords(c) for c in calls(tree, 'DeclareLaunchArgument')}


def test_launch_file_starts_an_executable_that_setup_py_installs() -> None:
    node = keywords(launch_node_call())
    assert literal(node['package']) == 'vpr_ros'
    executable = literal(node['executable'])
    scripts = console_scripts()
    assert executable in scripts, f'{executable!r} is not a console script of setup.py'
    module_name, function = scripts[executable].split(':')
    assert module_name == 'vpr_ros.nodes.relocalize_node'
    assert callable(getattr(importlib.import_module(module_name), function))
    # The parameters file is keyed by node name: the launch name must be the node's.
    assert literal(node['name']) == NODE_NAME


def test_launch_file_loads_the_installed_parameters_file() -> None:
    tree = ast.parse(LAUNCH_FILE.read_text())
    (share,) = calls(tree, 'get_package_share_directory')
    assert literal(share.args[0]) == 'vpr_ros'
    joins = [c for c in calls(tree, 'join') if getattr(c.args[0], 'id', None) == 'share']
    relative = Path(*(literal(a) for a in joins[0].args[1:]))
    assert relative == Path('config') / CONFIG_FILE.name
    assert (ROOT / relative).is_file()
    # setup.py installs config/*.yaml and launch/*.launch.py into share/vpr_ros.
    setup_source = (ROOT / 'setup.py').read_text()
    assert "glob('config/*.yaml')" in setup_source
    assert "glob('launch/*.launch.py')" in setup_source
    # The node gets the params_file argument, whose default is that file.
    arguments = launch_arguments()
    assert isinstance(arguments['params_file']['default_value'], ast.Name)
    parameters = keywords(launch_node_call())['parameters']
    configurations = [literal(c.args[0]) for c in calls(parameters, 'LaunchConfiguration')]
    assert configurations[0] == 'params_file'


def test_launch_file_sets_the_shipped_dds_profile_unless_one_is_set() -> None:
    tree = ast.parse(LAUNCH_FILE.read_text())
    (setter,) = calls(tree, 'SetEnvironmentVariable')
    assert [getattr(a, 'id', None) for a in setter.args] == ['PROFILE_ENV', 'profile']
    source = LAUNCH_FILE.read_text()
    assert "PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'" in source
    assert 'if os.environ.get(PROFILE_ENV):' in source  # a profile of the user's is kept
    assert "os.path.join(config_dir, 'fastdds.xml')" in source
    assert (ROOT / 'config' / 'fastdds.xml').is_file()
    assert "glob('config/*.xml')" in (ROOT / 'setup.py').read_text()


def test_launch_arguments_set_the_map_and_the_camera_topic() -> None:
    arguments = launch_arguments()
    assert {'map_dir', 'camera_topic', 'params_file'} <= set(arguments)
    assert 'default_value' not in arguments['map_dir']  # required
    node = keywords(launch_node_call())
    overrides = [d for d in ast.walk(node['parameters']) if isinstance(d, ast.Dict)]
    keys = {literal(k) for d in overrides for k in d.keys}
    assert keys == {'map_dir', 'use_sim_time'} and 'map_dir' in SPECS
    # The remaps come from camera_remappings (tested below) with the camera arguments.
    (remaps,) = calls(ast.parse(LAUNCH_FILE.read_text()), 'camera_remappings')
    arguments = [literal(c.args[0]) for c in calls(remaps, 'LaunchConfiguration')]
    assert arguments == ['params_file', 'camera_topic', 'camera_remaps']


def flatten(values: dict, prefix: str = '') -> dict:
    """Nested parameter dicts as ROS names them: ``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def test_parameters_file_sets_exactly_the_declared_parameters_to_their_defaults() -> None:
    config = yaml.safe_load(CONFIG_FILE.read_text())
    assert list(config) == [NODE_NAME]
    values = flatten(config[NODE_NAME]['ros__parameters'])
    assert set(values) == set(SPECS)
    for name, value in values.items():
        default = SPECS[name].default
        assert value == default, f'{name}: the file says {value!r}, the node {default!r}'
        # rclpy refuses a value of another type than the declared default (10 for 10.0).
        assert type(value) is type(default), name
        if isinstance(default, list):
            assert {type(v) for v in value} == {type(v) for v in default}, name


def test_shipped_parameter_files_are_the_ones_the_settings_tables_render() -> None:
    for name, text in shipped_params_files().items():
        path = ROOT / 'config' / name
        assert path.is_file(), f'config/{name} is missing; run python -m vpr_ros.nodes.params'
        assert path.read_text() == text, (
            f'config/{name} is stale; run python -m vpr_ros.nodes.params'
        )


def test_launch_description_builds_where_launch_ros_is_installed() -> None:
    launch_ros = pytest.importorskip('launch_ros')
    from ament_index_python.packages import PackageNotFoundError

    spec = importlib.util.spec_from_file_location('relocalize_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        description = module.generate_launch_description()
    except PackageNotFoundError:
        pytest.skip('vpr_ros is not installed in an ament workspace')
    nodes = [e for e in description.entities if isinstance(e, launch_ros.actions.Node)]
    assert len(nodes) == 1
    names = {argument.name for argument in description.get_launch_arguments()}
    assert {'map_dir', 'camera_topic', 'params_file'} <= names


def test_launch_arguments_cover_namespace_sim_time_log_level_and_camera_remaps() -> None:
    arguments = launch_arguments()
    assert {'namespace', 'use_sim_time', 'log_level', 'camera_remaps', 'rviz'} <= set(arguments)
    assert literal(arguments['use_sim_time']['default_value']) == 'false'
    node = keywords(launch_node_call())
    assert [literal(c.args[0]) for c in calls(node['namespace'], 'LaunchConfiguration')] == [
        'namespace'
    ]
    arguments_passed = [
        literal(c.args[0]) for c in calls(node['arguments'], 'LaunchConfiguration')
    ]
    assert arguments_passed == ['log_level']
    overrides = [d for d in ast.walk(node['parameters']) if isinstance(d, ast.Dict)]
    assert {'map_dir', 'use_sim_time'} == {literal(k) for d in overrides for k in d.keys}


def write_params(path: Path, parameters: dict, key: str = NODE_NAME) -> Path:
    path.write_text(yaml.safe_dump({key: {'ros__parameters': parameters}}))
    return path


def test_camera_topic_remaps_the_first_camera_the_params_file_names(tmp_path: Path) -> None:
    from vpr_ros.nodes.launch_args import camera_remappings

    assert camera_remappings(CONFIG_FILE, '/camera/image_raw') == [('image', '/camera/image_raw')]
    # A params_file with its own cameras: camera_topic still lands, on its first camera.
    params = write_params(tmp_path / 'two.yaml', {'camera_topics': ['front', 'rear']})
    assert camera_remappings(params, '/cam/front', 'rear:=/cam/rear') == [
        ('front', '/cam/front'),
        ('rear', '/cam/rear'),
    ]
    # Under a namespace, and with nested parameters, the node's section is still found.
    nested = tmp_path / 'ns.yaml'
    nested.write_text(
        yaml.safe_dump({'/robot1/relocalize': {'ros__parameters': {'camera_topics': ['left']}}})
    )
    assert camera_remappings(nested, '/robot1/left_cam') == [('left', '/robot1/left_cam')]


@pytest.mark.parametrize(
    ('remaps', 'expected'),
    [
        ('side:=/cam/side', "camera_remaps names 'side', but the node subscribes to the cameras"),
        ('front=/cam/front', "is not 'name:=topic'"),
    ],
)
def test_a_camera_remap_the_node_cannot_use_is_refused(
    tmp_path: Path, remaps: str, expected: str
) -> None:
    from vpr_ros.errors import ConfigError
    from vpr_ros.nodes.launch_args import camera_remappings

    params = write_params(tmp_path / 'p.yaml', {'camera_topics': ['front']})
    with pytest.raises(ConfigError, match=expected):
        camera_remappings(params, '', remaps)


def test_the_rviz_config_shows_the_node_outputs_and_is_installed() -> None:
    rviz = ROOT / 'config' / 'relocalize.rviz'
    config = yaml.safe_load(rviz.read_text())
    displays = {d['Class']: d for d in config['Visualization Manager']['Displays']}
    topics = {cls: d['Topic']['Value'] for cls, d in displays.items() if 'Topic' in d}
    assert topics == {
        'rviz_default_plugins/MarkerArray': 'relocalize/map_places',
        'rviz_default_plugins/PoseArray': 'relocalize/hypothesis_poses',
        'rviz_default_plugins/PoseWithCovariance': 'relocalize/pose',
    }
    # The map places are latched: RViz must ask for transient local to get them.
    marker_qos = displays['rviz_default_plugins/MarkerArray']['Topic']
    assert marker_qos['Durability Policy'] == 'Transient Local'
    assert "glob('config/*.rviz')" in (ROOT / 'setup.py').read_text()
    (rviz_node,) = [
        n
        for n in calls(ast.parse(LAUNCH_FILE.read_text()), 'Node')
        if literal(keywords(n)['package']) == 'rviz2'
    ]
    assert 'condition' in keywords(rviz_node)
