"""doa_jax: distill or annotate? Cost-efficient fine-tuning of compact T5 models in JAX."""

from setuptools import find_packages, setup

JAX_FLOOR = '0.7.1'                # jax.set_mesh; the accelerator extras pin the same floor
BERT_SCORE = 'bert-score>=0.3.13'

setup(
    name='doa_jax',
    version='0.1.0',
    description='Distill or annotate: a JAX/Flax T5 system for cost-efficient fine-tuning studies.',
    python_requires='>=3.11',                 # jax 0.7 dropped Python 3.10
    packages=find_packages(include=['doa_jax', 'doa_jax.*', 'tasks', 'tasks.*']),
    include_package_data=True,
    package_data={'doa_jax.cost': ['prices.yaml'], 'doa_jax.kernels': ['amx_matmul.cc']},
    install_requires=[
        # Floors are the oldest releases with the APIs the code calls.
        f'jax>={JAX_FLOOR}',              # jax.set_mesh (0.7.1); jax.ffi is older
        # flax.linen's logical sharding constraints see a jax.set_mesh mesh from 0.11.2 on; older
        # releases only see `with mesh:` and silently drop the constraints.
        'flax>=0.11.2',
        'optax>=0.2.5',                   # optax.tree.norm
        # Checkpointer.metadata(...).item_metadata (StepMetadata) and partial PyTreeRestore.
        'orbax-checkpoint>=0.11.22',
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
        # python -m doa_jax.serve: starlette app on uvicorn's h11 protocol (the server subclasses
        # it for a request-head deadline; timeout_graceful_shutdown, app_state).
        'starlette>=0.37',
        'uvicorn>=0.30',
        'scikit-learn>=1.3',
        'sacrebleu>=2.4',
        'matplotlib>=3.8',
        'scipy>=1.12',
        'pyyaml>=6.0',
        # tensorflow_datasets' builders (data prepare) import it without declaring it.
        'importlib_resources>=6.0',
    ],
    extras_require={
        # Accelerator builds of jaxlib: pip install -e '.[cuda12]' (NVIDIA, CUDA 12 wheels from
        # PyPI) or '.[tpu]' (Cloud TPU VMs, libtpu).
        'cuda12': [f'jax[cuda12]>={JAX_FLOOR}'],
        'tpu': [f'jax[tpu]>={JAX_FLOOR}'],
        # BERTScore for the MultiPIT_gen metric (BERT-iBLEU); pulls in PyTorch and transformers.
        'bertscore': [BERT_SCORE],
        'test': [
            'pytest>=8',
            'pytest-timeout>=2.3',
            'pytest-xdist>=3.5',
            'torch==2.13.0',
            'transformers>=4.45',
            BERT_SCORE,
        ],
        'hf': ['torch', 'transformers>=4.45'],
    },
)
