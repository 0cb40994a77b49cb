"""Packages for setuptools: every vramplan subpackage found on disk (a new one ships without
editing a list), plus the repository's data/ folder installed as vramplan/data. Metadata lives in
pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["vramplan", "vramplan.*"]), "vramplan.data"], package_dir={"vramplan.data": "data"})
