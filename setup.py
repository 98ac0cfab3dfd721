from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="llama",
    version="0.1.0",
    description="Llama 2 inference on CPU or GPU, one process or many, with the reference's API",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.10",
    install_requires=Path("requirements.txt").read_text().split(),
    extras_require={
        # Reading and writing Hugging Face checkpoints (config.json + model*.safetensors).
        "hf": ["safetensors"],
        # transformers is the independent implementation the tests compare logits against.
        "test": ["pytest", "ruff", "safetensors", "transformers"],
    },
)
