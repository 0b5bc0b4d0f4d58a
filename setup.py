"""doa_jax: distill or annotate? Cost-efficient fine-tuning of compact T5 models in JAX."""

from setuptools import find_packages, setup

setup(
    name='doa_jax',
    version='0.1.0',
    description='Distill or annotate: a JAX/Flax T5 system for cost-efficient fine-tuning studies.',
    python_requires='>=3.10',
    packages=find_packages(include=['doa_jax', 'doa_jax.*', 'tasks', 'tasks.*']),
    include_package_data=True,
    package_data={'doa_jax.cost': ['prices.yaml'], 'doa_jax.kernels': ['amx_matmul.cc']},
    install_requires=[
        'jax>=0.4.30',
        'flax>=0.10',
        'optax>=0.2.3',
        'orbax-checkpoint>=0.6',
        'gin-config>=0.5',
        'seqio>=0.0.19',
        'tensorflow-datasets>=4.9',
        'tensorstore>=0.1.60',
        'sentencepiece>=0.2',
        'msgpack>=1.0',
        'numpy>=1.26',
        'safetensors>=0.4',
        'clu>=0.0.10',
        'tensorboard>=2.15',
        'tqdm>=4.66',
        'httpx>=0.27',
        'scikit-learn>=1.3',
        'sacrebleu>=2.4',
        'bert-score>=0.3.13',
        'matplotlib>=3.8',
        'scipy>=1.11',
        'pyyaml>=6.0',
        'importlib_resources>=6.0',
    ],
    extras_require={
        'test': [
            'pytest>=8',
            'pytest-timeout>=2.3',
            'torch==2.13.0',
            'transformers>=4.45',
        ],
        'hf': ['torch', 'transformers>=4.45'],
    },
)
