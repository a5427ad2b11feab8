"""Packaging beyond setup.cfg: ship the Hydra configs of ``conf/`` inside the package.

``conf/`` stays at the top of the repository (where Hydra users look for it); in a
built wheel it is the package ``metaif_cli.conf``, so a non-editable install
(``pip install .``, ``pip wheel .``) finds its configs (``metaif_cli.cli.conf_dir``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["metaif_cli", "metaif_cli.*"]), "metaif_cli.conf"],
    package_dir={"metaif_cli.conf": "conf"},
    package_data={"metaif_cli.conf": ["*.yaml", "*/*.yaml"]},
    include_package_data=False,
)
