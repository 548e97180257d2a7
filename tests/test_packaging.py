"""pyproject.toml: what the code imports is declared, torch is a range, jobs/setup_env.sh pins the tested build."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import torch
import torchvision

from conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SETUP_ENV = (REPO / "jobs" / "setup_env.sh").read_text()
OWN_MODULES = {"hybridgan", "jobs", "conftest", "stage_runs", "test_photo"}
TRACKER_PACKAGES = {"mlflow", "mlflow-skinny"}
"""Optional: hybridgan.tracking imports one only when `tracking.backends` names it (and says so when absent)."""


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("Foo_Bar>=1" -> "foo-bar")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def _imported_distributions(folders: list[str]) -> dict[str, str]:
    """Normalised distribution name -> a module importing it, for every third-party top-level import."""
    owners = packages_distributions()
    found = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for top in {module.split(".")[0] for module in modules} - OWN_MODULES - set(sys.stdlib_module_names):
                    for distribution in owners.get(top, [top]):
                        found.setdefault(_name(distribution), str(path.relative_to(REPO)))
    return found


def test_every_import_of_the_package_and_the_jobs_is_a_declared_dependency_or_the_deepspeed_extra():
    declared = {_name(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["deepspeed"]}
    missing = {dist: where for dist, where in _imported_distributions(["hybridgan", "jobs"]).items()
               if dist not in declared | TRACKER_PACKAGES}
    assert missing == {}


def test_every_import_of_the_tests_is_declared_or_in_the_test_extra():
    extras = PROJECT["optional-dependencies"]
    declared = {_name(r) for r in PROJECT["dependencies"] + extras["deepspeed"] + extras["test"]}
    missing = {dist: where for dist, where in _imported_distributions(["tests"]).items() if dist not in declared}
    assert missing == {}


def test_torch_is_a_range_deepspeed_an_extra_and_accelerate_below_its_next_major():
    dependencies = {_name(r): r for r in PROJECT["dependencies"]}
    assert dependencies["torch"] == "torch>=2.4" and dependencies["torchvision"] == "torchvision>=0.19"
    assert dependencies["accelerate"] == "accelerate>=1.10,<2"
    assert "deepspeed" not in dependencies and "transformers" not in dependencies
    assert {_name(r) for r in PROJECT["optional-dependencies"]["deepspeed"]} == {"deepspeed", "transformers"}
    assert PROJECT["scripts"] == {"hybridgan": "hybridgan.cli:main"}


def test_setup_env_pins_the_tested_torch_build_and_installs_the_extras_the_tests_need():
    assert "pins=(torch==2.14.1 torchvision==0.29.1)" in SETUP_ENV
    assert '-e "$repo[test,deepspeed]" \\\n    "${pins[@]}"' in SETUP_ENV
    assert torch.__version__.split("+")[0] == "2.14.1" and torchvision.__version__.split("+")[0] == "0.29.1"
