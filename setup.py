from setuptools import find_packages, setup

setup(
    name="leedl_fast",
    version="0.1.0",
    description="Triton kernels (fused and banded attention, fused diffusion noising) behind drop-in "
    "PyTorch modules for the models of Hung-yi Lee's deep-learning course",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is installed as the subpackage leedl_fast.kernels, never as a top-level "kernels".
    packages=find_packages(include=["leedl_fast", "leedl_fast.*"]) + ["leedl_fast.kernels"],
    package_dir={"leedl_fast": "leedl_fast", "leedl_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6", "diffusers>=0.30", "scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4"],
        "demo": ["tqdm>=4", "matplotlib>=3.7", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["leedl-fast=leedl_fast.cli:main"]},
)
