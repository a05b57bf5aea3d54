"""minimm: a minimal multimodal language model, written from scratch to be read and trained anywhere."""
from setuptools import find_packages, setup

setup(
    name="minimm",
    version="0.1.0",
    description="A small, readable multimodal GPT (text, code, images, audio) that trains on a laptop or a GPU.",
    packages=find_packages(include=["minimm", "minimm.*"]),
    python_requires=">=3.11",  # the GPT-4 split pattern uses possessive quantifiers (re, 3.11+)
    install_requires=["numpy", "torch>=2.4", "tiktoken", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton; platform_system == 'Linux'"],
        "opencl": ["pyopencl"],
        "dev": [
            "pytest",
            "hypothesis",
            "triton; platform_system == 'Linux'",
            "pyopencl",
            "pocl-binary-distribution",
            "librosa",  # test-only: the reference our mel filterbank must equal
            "selenium",  # test-only: drives headless Chromium through the chat page
        ],
    },
)
