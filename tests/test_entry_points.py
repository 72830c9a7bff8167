"""Every command the README documents runs (`--help`) in the environment its section installs.

A section's install line (`pip install -e .` or `pip install -e '.[extra,...]'`) decides which installed
distributions the commands after it may see: the project's requirements for those extras and, transitively,
theirs. The commands run with `python -S` over a folder of links to exactly those distributions, so an import
that the section's install would not provide fails here as it would on a fresh machine (the load-test runner
once needed httpx, which only the test extra installed).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "reformer-server"
INSTALL = re.compile(r"pip install -e (?:'\.\[([a-z,]+)\]'|\.(?=\s|$))")
COMMAND = re.compile(r"\.venv/bin/python -m ([\w.]+)")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def documented_commands() -> list[tuple[str, frozenset[str]]]:
    """(module, extras) for each `python -m` in the README's shell blocks, with the install line before it."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        extras = None
        for line in block.splitlines():
            for match in re.finditer(f"{INSTALL.pattern}|{COMMAND.pattern}", line):
                install = INSTALL.match(match.group(0))
                if install:
                    extras = frozenset(filter(None, (install.group(1) or "").split(",")))
                    continue
                module = COMMAND.match(match.group(0)).group(1)
                assert extras is not None, f"`python -m {module}` in README.md follows no install line in its block"
                commands.append((module, extras))
    return sorted(set(commands))


def distributions(extras: frozenset[str]) -> set[str]:
    """The distributions `pip install -e '.[extras]'` installs (names normalised), markers evaluated here."""
    wanted, found = [(PROJECT, extras)], set()
    while wanted:
        name, chosen = wanted.pop()
        key = (normal(name), chosen)
        if key in found:
            continue
        found.add(key)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in chosen] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                wanted.append((requirement.name, frozenset(requirement.extras)))
    return {name for name, _ in found}


def site_with_only(names: set[str], folder: Path) -> Path:
    """A folder of links to the top-level files of the given distributions (and their metadata)."""
    folder.mkdir()
    for distribution in metadata.distributions():
        if normal(distribution.metadata["Name"]) not in names or normal(distribution.metadata["Name"]) == PROJECT:
            continue
        base = Path(distribution.locate_file(""))
        for top in {Path(f).parts[0] for f in distribution.files or [] if not str(f).startswith("..")}:
            if not (folder / top).exists() and (base / top).exists():
                (folder / top).symlink_to(base / top)
    return folder


COMMANDS = documented_commands()


def test_the_readme_documents_the_entry_points():
    modules = {module for module, _ in COMMANDS}
    assert {"server", "pytest", "export", "training.train", "bench.loadtest.run", "bench.report"} <= modules


@pytest.mark.parametrize("module, extras", COMMANDS, ids=[f"{m}[{','.join(sorted(e))}]" for m, e in COMMANDS])
def test_command_runs_with_only_its_sections_install(module, extras, tmp_path):
    site = site_with_only(distributions(extras), tmp_path / "site")
    run = ("import runpy, sys; root, site, module = sys.argv[1:4]; sys.path[:0] = [root, site]; "
           "sys.argv = [module, '--help']; runpy.run_module(module, run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-S", "-c", run, str(ROOT), str(site), module],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr[-3000:]


def test_a_missing_distribution_is_missing_there(tmp_path):
    """The check can fail: the load-test runner without the loadtest extra cannot import httpx."""
    site = site_with_only(distributions(frozenset()), tmp_path / "site")
    result = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}];"
                             " import bench.loadtest.run"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "No module named 'httpx'" in result.stderr
