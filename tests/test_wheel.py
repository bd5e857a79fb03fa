"""The built wheel: it holds every file the package needs, and (e2e) a non-editable install of it serves a request
through `ray start` + `serve deploy`, the Docker image's path without Docker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    """Tracked and untracked, not ignored files of the repository (what a clean checkout builds from)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the source tree (never builds inside the shared working tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in _source_files():
        if f.startswith(("elasticmoe/", "protos/")) or f in ("pyproject.toml", "README.md"):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = (tmp / "dist").glob("elasticmoe-*.whl")
    return whl


def test_wheel_holds_every_package_file(wheel):
    """Every file under elasticmoe/ in the checkout, Python or not (cpu_gemm.c, tile configs, .pyi), is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f for f in _source_files() if f.startswith("elasticmoe/")}
    data = {f for f in needed if not f.endswith(".py")}
    assert "elasticmoe/kernels/cpu_gemm.c" in data and any(f.endswith(".pyi") for f in data)
    assert sorted(needed - names) == [], "pyproject.toml [tool.setuptools.package-data] misses these"
    with zipfile.ZipFile(wheel) as z:
        assert z.read("elasticmoe/kernels/cpu_gemm.c") == (ROOT / "elasticmoe/kernels/cpu_gemm.c").read_bytes()


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    """The wheel's files unpacked into site/ (what a non-editable install puts in site-packages)."""
    root = tmp_path_factory.mktemp("unpacked")
    zipfile.ZipFile(wheel).extractall(root / "site")
    return root


def _run_installed(root: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`python ARGS` run in `root`, no checkout in sight, the unpacked wheel ahead of the project venv (whose
    packages stay importable; its editable elasticmoe comes after PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(root / "site"), "ELASTICMOE_CACHE": str(root / "cache")}
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_installed_demo_has_its_default_config(unpacked):
    """`elasticmoe demo` with no --config, from the installed package: its default was the checkout's
    deployments/tiny.yaml, which no wheel holds ('--config <site-packages>/deployments/tiny.yaml: cannot be read',
    a flag never given). The config it deploys now comes from the package: deployments/tiny.yaml with the demo
    model, a Serve config the demo reads back and whose args resolve."""
    code = ("import elasticmoe, yaml; from elasticmoe import cli_demo; from elasticmoe.app import resolve_args; "
            "out, _ = cli_demo._demo_config(None, 'tiny:demo'); doc = cli_demo._read_serve_config(out); "
            "resolve_args(doc['applications'][0]['args']); print(elasticmoe.__file__); print(out); "
            "print(yaml.safe_dump(doc))")
    proc = _run_installed(unpacked, ["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, out, text = proc.stdout.split("\n", 2)
    assert where.startswith(str(unpacked / "site")), where  # the wheel's package, not the checkout's
    assert out.startswith(str(unpacked / "cache")), out
    shipped = yaml.safe_load((ROOT / "deployments" / "tiny.yaml").read_text())
    shipped["applications"][0]["args"]["model"] = "tiny:demo"
    assert yaml.safe_load(text) == shipped


def test_python_m_elasticmoe_runs_the_command(unpacked):
    """`python -m elasticmoe` was 'No module named elasticmoe.__main__' (only `python -m elasticmoe.cli` ran): the
    installed package runs the `elasticmoe` command, its exit status included."""
    assert (unpacked / "site" / "elasticmoe" / "__main__.py").is_file()
    proc = _run_installed(unpacked, ["-m", "elasticmoe", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: elasticmoe") and "make-tiny-model" in proc.stdout, proc.stdout
    bad = _run_installed(unpacked, ["-m", "elasticmoe", "offline", "hi", "--model", "tiny:nope"])
    assert bad.returncode == 1 and "elasticmoe offline: error:" in bad.stderr, bad.stderr
    assert "unknown tiny family 'nope'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_cpu_gemm_without_its_source_falls_back(tmp_path, monkeypatch):
    """An install that lost cpu_gemm.c gets the torch path (None), not FileNotFoundError on the first linear."""
    from elasticmoe.kernels import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_SRC", tmp_path / "missing" / "cpu_gemm.c")
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", sys.executable)  # any existing program: the source read comes first
    assert cpu_gemm._build() is None
    assert not (tmp_path / "cache").exists()


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed non-editable. Its dependencies (torch, ray, ...) come from the project
    venv through a .pth path entry (no download); the project venv's editable elasticmoe hook is not processed
    there, so `import elasticmoe` resolves to the wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    py = root / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)
    return py


def _ray_running() -> bool:
    """Whether a Ray head (the session's `ray_cluster`, say) listens on 127.0.0.1:6379."""
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


@pytest.fixture
def own_ray():
    """The wheel's venv needs the fixed ports: stop any running cluster first, and restart it afterwards so later
    tests that share the session's `ray_cluster` still find one."""
    import ray

    from elasticmoe import local_cluster as lc

    was_running = _ray_running()
    if ray.is_initialized():
        ray.shutdown()
    lc.stop_ray()
    yield
    lc.stop_ray()
    if was_running:
        lc.start_ray(num_cpus=8)


@pytest.mark.e2e
def test_installed_wheel_serves_a_request(wheel, tmp_path, own_ray):
    """Fresh venv + wheel -> `ray start` / `serve deploy deployments/tiny.yaml` (as `make run` deploys it) from it
    -> gRPC greedy tokens equal LLM.generate's on the checkpoint it built; its `elasticmoe status` lists both shards.
    Runs before the session's cluster starts (conftest orders it first): no cluster to stop and restart."""
    from elasticmoe import LLM, SamplingParams
    from elasticmoe.client import GenerationClient
    from elasticmoe.local_cluster import ray_env

    py = _fresh_venv(tmp_path / "venv", wheel)
    where = subprocess.run([str(py), "-c", "import elasticmoe.kernels.cpu_gemm as m; print(m.__file__, "
                            "m._SRC.is_file())"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(tmp_path / "venv")) and where.split()[1] == "True", where
    env = ray_env({"ELASTICMOE_CACHE": str(tmp_path / "cache"), "PATH": f"{py.parent}{os.pathsep}{os.environ['PATH']}"})
    ray_cli = [str(py), "-c", "from ray.scripts.scripts import main; main()"]
    serve_cli = [str(py), "-c", "from ray.serve.scripts import cli; cli()"]

    def run(args, timeout=300):
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (f"{args[3:]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
        return proc

    run(ray_cli + ["start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                   "--dashboard-port=8265", "--num-cpus=4", "--disable-usage-stats"])
    try:
        run(serve_cli + ["deploy", str(ROOT / "deployments" / "tiny.yaml"), "-a", "http://127.0.0.1:8265"])
        import yaml

        from elasticmoe.local_cluster import wait_running

        wait_running("elasticmoe", timeout=600)  # polls the dashboard over HTTP
        status = run(serve_cli + ["status", "-a", "http://127.0.0.1:8265"]).stdout  # the wheel's own CLI
        app = ((yaml.safe_load(status) or {}).get("applications") or {}).get("elasticmoe") or {}
        assert app.get("status") == "RUNNING", status
        r = GenerationClient("127.0.0.1:9000").generate("The expert said", max_tokens=12, temperature=0.0,
                                                        ignore_eos=True)
        built = tmp_path / "cache" / "tiny-mixtral"  # what the wheel's replicas made and loaded
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        ref = LLM(str(built)).generate(["The expert said"], greedy)
        assert list(r.token_ids) == ref[0].token_ids
        out = run([str(py), "-m", "elasticmoe.cli", "status"], timeout=120).stdout
        assert "placement version" in out and "balancedness" in out, out
        assert out.count("127.0.0.1:") >= 2, out  # both shards listed with their addresses
    finally:
        subprocess.run(ray_cli + ["stop", "--force"], env=env, capture_output=True, timeout=120)
