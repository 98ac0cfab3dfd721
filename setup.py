from pathlib import Path

from setuptools import find_packages, setup

SERVE = ["fastapi", "uvicorn", "prometheus-client"]

setup(
    name="llama",
    version="0.1.0",
    description="Llama 2 inference on CPU or GPU, one process or many, with the reference's API",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["llama", "llama.*"]),
    # The server's chat page, and the CPU kernels' source (compiled on first use).
    package_data={"llama": ["static/*", "kernels.cpp"]},
    python_requires=">=3.10",
    install_requires=Path("requirements.txt").read_text().split(),
    extras_require={
        # Reading and writing Hugging Face checkpoints (config.json + model*.safetensors).
        "hf": ["safetensors"],
        # The OpenAI-compatible server: FastAPI (Starlette + pydantic) on uvicorn, as vLLM and
        # llama-cpp-python serve, and Prometheus's own client for /metrics.
        "serve": SERVE,
        # transformers is the independent implementation the tests compare logits against; the
        # official openai client and httpx talk to the server as applications do; Playwright drives
        # Debian's Chromium through the chat page (its own browser download is never used).
        "test": ["pytest", "ruff", "safetensors", "transformers", "openai", "httpx", "playwright", *SERVE],
    },
)
