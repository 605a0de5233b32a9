"""Only what pyproject.toml cannot say: ship csrc/ inside the package as ``fastedit._csrc``,
so that a regular wheel install can JIT-build the extension (fastedit/_ext.py) from it.
The globs of [tool.setuptools.package-data] pick its .cpp/.cu/.h files."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastedit", "fastedit.*"]) + ["fastedit._csrc"],
    package_dir={"fastedit._csrc": "csrc"},
)
