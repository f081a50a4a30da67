"""Beam's --setup_file for Dataflow workers needs a setup.py; the metadata lives in pyproject.toml."""

from setuptools import setup

setup()
