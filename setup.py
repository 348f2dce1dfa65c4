"""Installs the import package ``longtrain``.

The repository keeps its four rooms at the top level (model/, data/, train/, launch/); this
file maps them onto ``longtrain.model``, ``longtrain.data``, ``longtrain.train`` and
``longtrain.launch``. ``longtrain`` itself is a namespace package.

torch is deliberately unpinned: a GPU cluster keeps the CUDA build it has. On a CPU machine,
install ``torch==2.13.0`` first (``make test`` does) so that pip never pulls a CUDA build.
"""

from setuptools import setup

ROOMS = ["model", "data", "train", "launch"]

setup(
    name="longtrain",
    version="0.1.0",
    description="Distributed long-context pretraining: Llama-shaped model, ZeRO + Ulysses SP",
    python_requires=">=3.10",
    packages=[f"longtrain.{room}" for room in ROOMS] + ["longtrain.train.eval"],
    package_dir={f"longtrain.{room}": room for room in ROOMS}
    | {"longtrain.train.eval": "train/eval"},
    package_data={"longtrain.launch": ["configs/*.yaml", "slurm/*.sbatch", "hostfile.example"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        # peft: tests/test_export_peft.py loads our LoRA adapter exports with it.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "peft>=0.10"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["longtrain=longtrain.launch.cli:main"]},
)
