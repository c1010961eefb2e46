from setuptools import find_packages, setup

setup(
    name="mlpug",
    version="0.1.0",
    description="A machine learning library agnostic framework for model training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mlpug", "mlpug.*"]),
    package_data={"mlpug": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors==0.8.*"],
    extras_require={
        "pytorch": ["torch==2.13.0"],
        "tensorflow": ["tensorflow-cpu==2.21.*"],
        "tensorboard": ["tensorboard"],
        "progress": ["tqdm"],
        "history": ["pandas"],
        "plot": ["pandas", "matplotlib"],
        "dev": ["pytest", "pytest-timeout", "ruff", "tqdm", "tensorboard", "pandas", "matplotlib"],
    },
)
