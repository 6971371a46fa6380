"""How `mmalign app` finds the apps (installed as mmalign.apps, or the clone's apps/ folder), the
packaging that ships them in a wheel, and the CLI."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _restore_apps_modules(saved: dict) -> None:
    for name in [n for n in sys.modules if n == "mmalign.apps" or n.startswith("mmalign.apps.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def isolated_apps_modules():
    saved = {n: m for n, m in sys.modules.items() if n == "mmalign.apps" or n.startswith("mmalign.apps.")}
    yield
    _restore_apps_modules(saved)


def test_lookup_loads_an_apps_folder_as_mmalign_apps(isolated_apps_modules, tmp_path):
    from mmalign.cli import apps_package

    copy = tmp_path / "elsewhere" / "apps"
    shutil.copytree(REPO / "apps", copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name in [n for n in sys.modules if n == "mmalign.apps" or n.startswith("mmalign.apps.")]:
        del sys.modules[name]
    module = apps_package(repo_apps=copy)
    assert module.__name__ == "mmalign.apps" and Path(module.__file__).parent == copy
    assert module.app_names() == ["compare", "trajectory", "rewards", "runs"]
    assert Path(module.app_module("runs").__file__).parent == copy  # submodules resolve inside that folder
    assert apps_package() is module  # found once, then reused


def test_lookup_without_apps_says_how_to_fix(isolated_apps_modules, tmp_path):
    from mmalign.cli import CLIError, apps_package

    with pytest.raises(CLIError, match="apps are not installed"):
        apps_package(repo_apps=tmp_path / "no-apps-here")


def test_default_lookup_finds_the_repository_apps(apps):
    assert Path(apps.__file__).resolve().parent == REPO / "apps"
    assert set(apps.APPS) == {"compare", "trajectory", "rewards", "runs"}


def test_pyproject_ships_every_package_and_maps_apps():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"mmalign.apps": "apps"}
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mmalign").rglob("__init__.py")}
    missing = on_disk - set(setuptools["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert "mmalign.apps" in setuptools["packages"]
    assert any(dep.startswith("playwright") for dep in config["project"]["optional-dependencies"]["test"])


def test_wheel_contains_the_apps(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    for name in ("mmalign", "apps"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mmalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "common", "compare", "trajectory", "rewards", "runs"):
        assert f"mmalign/apps/{module}.py" in names
    assert "mmalign/cli.py" in names and not any(n.startswith("apps/") for n in names)


def test_cli_lists_and_rejects(apps, capsys):
    from mmalign.cli import main

    assert main(["app", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("compare", "trajectory", "rewards", "runs"):
        assert name in out
    assert main(["app"]) == 2
    assert "name an app" in capsys.readouterr().err
    assert main(["app", "nope"]) == 2
    assert "unknown app 'nope'" in capsys.readouterr().err
    assert main(["app", "runs", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_cli_starts_on_loopback_unless_asked(apps, monkeypatch, capsys):
    from mmalign.cli import main

    calls = []
    monkeypatch.setattr(apps, "launch", lambda demo, **kw: calls.append((demo, kw)))
    assert main(["app", "runs", "--device", "cpu"]) == 0
    assert calls[-1][1] == {"host": "127.0.0.1", "port": None, "share": False, "block": True}
    assert main(["app", "runs", "--device", "cpu", "--host", "0.0.0.0", "--port", "7999", "--share"]) == 0
    assert calls[-1][1] == {"host": "0.0.0.0", "port": 7999, "share": True, "block": True}
    assert "anyone who can reach this machine" in capsys.readouterr().err
