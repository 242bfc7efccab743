# The cffi extension needs setuptools' cffi_modules hook; all other
# metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
