"""The project as a user gets it: a plain (non-editable) wheel installed in a fresh venv.

The wheel is built offline from a copy of the working tree and installed with `--no-deps` into a
venv that has no project of its own; the dependencies come from the dev venv's site-packages
through a `.pth` line (a folder added that way has its own .pth files ignored, so the dev venv's
editable finder stays off and `workbench` can only come from the wheel). From a folder outside
the checkout the installed `workbench` then captures and analyses a tiny model with the default
(bundled) text, serves `workbench app` headless, and the installed router renders its Home page.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~1-2 min: a wheel build, a venv and three fresh interpreters

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "artifacts", ".workbench")
LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the tree so no build/ or egg-info lands in the checkout."""
    src = tmp_path_factory.mktemp("src") / "project"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    dist = src.parent / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
        check=True,
        capture_output=True,
    )
    (built,) = dist.glob("mi_workbench-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> dict:
    """A fresh venv holding only the wheel; dependencies visible from the dev venv by a .pth line."""
    root = tmp_path_factory.mktemp("fresh")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        check=True,
        capture_output=True,
    )
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root)
    Path(site.strip(), "_dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    home = root / "home"
    home.mkdir()
    return {"root": root, "dir": env_dir, "python": python, "site": Path(site.strip()), "home": home}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return env | {"WORKBENCH_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def _run(*cmd, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_wheel_installs_only_under_the_workbench_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"workbench", "mi_workbench-0.1.0.dist-info"}
    for shipped in (
        "workbench/py.typed",
        "workbench/resources/sample.txt",
        "workbench/app_pages/main.py",
        "workbench/app_pages/.streamlit/config.toml",
        "workbench/analyses/activation_stats.py",
        "workbench/sae/archs.py",
        "mi_workbench-0.1.0.dist-info/licenses/LICENSE",
    ):
        assert shipped in names, shipped
    assert (
        "Apache License"
        in zipfile.ZipFile(wheel).read("mi_workbench-0.1.0.dist-info/licenses/LICENSE").decode()
    )


def test_installed_package_runs_an_analysis_on_the_default_text(venv, tiny_model_dir):
    """`workbench run activation-stats` from outside the checkout captures from the bundled sample
    text (package data) and reports the same statistics as a second, cached call."""
    where = _run(
        venv["python"],
        "-c",
        "import workbench, workbench.data as d; print(workbench.__file__); print(d.default_source())",
        cwd=venv["root"],
    ).split()
    assert all(Path(p).is_relative_to(venv["site"]) for p in where), where
    assert Path(where[1]).read_text() == (ROOT / "workbench" / "resources" / "sample.txt").read_text()
    cmd = [venv["dir"] / "bin" / "workbench", "run", "activation-stats", "--model", tiny_model_dir]
    cmd += ["--n-tokens", "256", "--ctx-len", "32", "--json"]
    first = json.loads(_run(*cmd, cwd=venv["root"], env=_env(venv["home"])))
    (run_json,) = (venv["home"] / "stores").glob("*/run.json")
    assert json.loads(run_json.read_text())["config"]["data"] == where[1]
    assert first and json.loads(_run(*cmd, cwd=venv["root"], env=_env(venv["home"]))) == first


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as the kernel writes them) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                    found.add(address)
    return found


def _serve_until_healthy(cmd: list, cwd: Path, env: dict, port: int, timeout: float = 180) -> set[str]:
    """Start a server, wait until /_stcore/health answers, return its listening addresses, stop it."""
    from workbench.app_pages._demo import _wait_healthy

    proc = subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, timeout)
        return _listening(port)
    except RuntimeError as err:  # the server exited: show why
        raise AssertionError(f"{err}\n{proc.stdout.read().decode()[-3000:]}") from err
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_installed_app_serves_on_loopback_and_renders_home(venv):
    from workbench.app_pages._demo import free_port

    env, cwd = _env(venv["home"]), venv["root"]
    port = free_port()
    app = [venv["dir"] / "bin" / "workbench", "app", "--port", port]
    assert _serve_until_healthy(app, cwd, env, port) == {LOOPBACK}
    # Plain `streamlit run` of the installed router, no address given: the config shipped beside it applies.
    router = venv["site"] / "workbench" / "app_pages" / "main.py"
    port = free_port()
    plain = [
        venv["python"],
        "-m",
        "streamlit",
        "run",
        router,
        "--server.port",
        port,
        "--server.headless",
        "true",
    ]
    assert _serve_until_healthy(plain, cwd, env, port) == {LOOPBACK}
    rendered = _run(
        venv["python"],
        "-c",
        "from streamlit.testing.v1 import AppTest; import sys; "
        f"at = AppTest.from_file({str(router)!r}, default_timeout=120); at.run(); "
        "assert not at.exception, [e.value for e in at.exception]; print(at.title[0].value)",
        cwd=cwd,
        env=env,
    )
    assert rendered.strip() == "Mechanistic interpretability workbench"
