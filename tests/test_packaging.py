"""Packaging contracts: each extra brings what its package imports; the wheel holds what it must.

Static (fast, default suite): every third-party import of each package, at module level or
inside a function, followed through the other cxr packages it imports (module by module), must
be a requirement of ``pip install .`` plus that package's extra, unless listed below as
optional with a reason. The reverse holds too: an extra names nothing its package never
imports. So ``setup.cfg`` cannot drift from the code again.

Wheel (fast, default suite): ``pip wheel`` of a clean copy of this checkout holds the four
packages, the embedded default model and the bundled sample, and no tests or test data.

Fresh virtual environments (``-m slow``): the wheel installed with each torch-free extra (base,
``.[bench]``, ``.[dicom]``, ``.[pacs]``) into a new venv runs that extra's own command. ``.[train]`` and
``.[export]`` install the 5.5 GB torch wheel, so they also need ``CXR_VENV_TORCH=1``;
``.[gpu]`` downloads onnxruntime-gpu and needs ``CXR_VENV_GPU=1`` (checked on a CPU: the CUDA
provider is present and cxr-infer runs):

    python3 -m pytest -q -p no:cacheprovider -m slow tests/test_packaging.py
    CXR_VENV_TORCH=1 CXR_VENV_GPU=1 python3 -m pytest -q -p no:cacheprovider -m slow tests/test_packaging.py
"""
from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "chest_xray_224"
SAMPLES = REPO / "runtime" / "cxr_infer" / "samples"
SAMPLE = SAMPLES / "person1_virus_6.jpeg"
DEFAULT_MODEL = REPO / "runtime" / "cxr_infer" / "models" / "default.onnx"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # as README's test command

#: Which packages each way of installing is for (the extra's own command).
EXTRA_PACKAGES: Dict[str, List[str]] = {
    "": ["cxr_infer"],         # pip install .      -> cxr-infer, cxr_infer.Classifier
    "dicom": ["cxr_infer", "cxr_hospital"],  # .[dicom] -> DICOM inputs, --format dicom-sr and fhir
    "pacs": ["cxr_hospital"],  # .[pacs]            -> cxr-pacs (Orthanc REST; reads images, writes SRs)
    "node": ["cxr_hospital"],  # .[node]            -> cxr-node (pynetdicom: a DICOM node, SRs back to the PACS)
    "gpu": ["cxr_infer"],      # .[gpu]             -> --device cuda
    "openvino": ["cxr_infer"],  # .[openvino]       -> --device openvino (the OpenVINO runtime)
    "train": ["cxr_train"],    # .[train]           -> cxr-train
    "export": ["cxr_export"],  # .[export]          -> cxr-export
    "bench": ["cxr_bench"],    # .[bench]           -> cxr-bench
    "serve": ["cxr_serve"],    # .[serve]           -> cxr-serve (FastAPI, uvicorn, Prometheus metrics)
    "ray": ["cxr_serve"],      # .[ray]             -> cxr-serve --ray, cxr-infer --ray, --format parquet
}

#: Imports a package may make without its extra requiring them. Each must be guarded by
#: ``try: ... except ImportError`` in every module that imports it (checked below).
OPTIONAL: Dict[str, str] = {
    # cxr_infer.dicom._pydicom(): DICOM inputs only; without pydicom a DICOM input fails with
    # "install the DICOM extra: pip install 'cxr[dicom]'" and every other format still works.
    "pydicom": "dicom",
    # cxr_hospital.sr._highdicom(): --format dicom-sr and cxr-pacs only; without highdicom they say
    # "writing DICOM SR needs highdicom: pip install 'cxr[dicom]'" (exit 2) and every other
    # format, --format fhir included, still works.
    "highdicom": "dicom",
    # cxr_infer.dicom._have_gdcm(): only asks whether GDCM is there, to say how to install it when
    # compressed pixel data (JPEG Lossless, JPEG-LS, JPEG 2000) cannot be decoded; pydicom does the
    # decoding through it.
    "gdcm": "dicom",
    # cxr_bench.domain_kinds: scikit-image's sample images are one optional source of out-of-domain
    # images for `cxr-bench domain`; skipped when scikit-image is absent (matplotlib's sample
    # photo and MRI slice, which the bench extra brings, are the other).
    "skimage": "",
    # cxr_infer.ov_session.openvino_runtime(): --device openvino (and auto, where it can) only; without
    # the runtime, --device openvino says "pip install 'cxr[openvino]'" (exit 2) and auto takes the CPU.
    "openvino": "openvino",
    # cxr_hospital.node.run(): cxr-node only; without pynetdicom it says "cxr-node needs pynetdicom:
    # pip install 'cxr[node]'" (exit 2) and cxr-pacs, --format dicom-sr and fhir still work.
    "pynetdicom": "node",
    # cxr_serve.rayutil.import_ray()/import_serve(): cxr-serve --ray and cxr-infer --ray only; without Ray
    # they say "Ray is not installed: pip install 'cxr[ray]'" (exit 2) and cxr-serve alone still works.
    "ray": "ray",
    # cxr_serve.parquet._pyarrow(): --format parquet only; without pyarrow it names the ray extra.
    "pyarrow": "ray",
}

#: The extra of each package (what its own command needs).
PACKAGE_EXTRA = {"cxr_infer": "", "cxr_train": "train", "cxr_export": "export", "cxr_bench": "bench",
                 "cxr_hospital": "pacs", "cxr_serve": "serve"}

#: The cxr packages each package may import (DESIGN.md: dependencies point one way; the runtime
#: imports none, integrations sit on top of it).
MAY_IMPORT: Dict[str, Set[str]] = {
    "cxr_infer": set(),
    "cxr_hospital": {"cxr_infer"},
    "cxr_train": {"cxr_infer"},
    "cxr_export": {"cxr_infer", "cxr_train"},
    "cxr_bench": {"cxr_infer", "cxr_export", "cxr_train"},
    "cxr_serve": {"cxr_infer"},
}

#: Imports a package reaches only on a path that documents another extra. (package, import
#: target) -> (the other extra, the modules allowed to make that import).
CROSS_EXTRA: Dict[Tuple[str, str], Tuple[str, Set[str]]] = {
    # `cxr-bench latency --checkpoint RUN` times the PyTorch eager baseline in cxr_bench.worker:
    # it needs pip install '.[bench,train]'. cxr_bench reaches cxr_train (which ships in every
    # install) only through cxr_bench.upstream: the torch-free checkpoint_summary (which run
    # folder, and which extras to install when torch is missing), load_checkpoint (the baseline,
    # torch) and `cxr-bench domain --validation`'s split (the torch-free cxr_train.data).
    ("cxr_bench", "torch"): ("train", {"cxr_bench.worker"}),
    ("cxr_bench", "cxr_train"): ("train", {"cxr_bench.upstream"}),
}

#: Import name -> the distributions that provide it (default: the same name).
PROVIDERS: Dict[str, Set[str]] = {
    "PIL": {"pillow"},
    "skimage": {"scikit-image"},
    "onnxruntime": {"onnxruntime", "onnxruntime-gpu"},
    "fhir": {"fhir-resources"},
    "gdcm": {"python-gdcm"},
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(text: str) -> Set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)))
    return names


@dataclass(frozen=True)
class SetupCfg:
    package_dir: Dict[str, Path]
    base: Set[str]
    extras: Dict[str, Set[str]]

    def requires(self, extra: str) -> Set[str]:
        return self.base | (self.extras[extra] if extra else set())


def read_setup_cfg() -> SetupCfg:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(REPO / "setup.cfg")
    pkg_dir = {}
    for line in cp["options"]["package_dir"].splitlines():
        if "=" in line:
            name, path = (s.strip() for s in line.split("=", 1))
            pkg_dir[name] = REPO / path
    extras = {name: _requirement_names(v) for name, v in cp["options.extras_require"].items()}
    return SetupCfg(pkg_dir, _requirement_names(cp["options"]["install_requires"]), extras)


# ---------------------------------------------------------------- the import graph


@dataclass(frozen=True)
class Site:
    """One import statement: ``module`` (dotted) imports ``target`` (dotted) at ``line``."""
    module: str
    path: Path
    line: int
    target: str
    guarded: bool  # inside ``try:`` with an ``except ImportError`` (or ModuleNotFoundError)

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line} imports {self.target}"


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    t = handler.type
    for node in (t.elts if isinstance(t, ast.Tuple) else [t]):
        if isinstance(node, ast.Name):
            names.append(node.id)
    return any(n in ("ImportError", "ModuleNotFoundError") for n in names)


def _sites(path: Path, module: str, is_package: bool) -> List[Site]:
    out: List[Site] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:  # imports for type checkers only never run
                visit(child, guarded)
            return
        if isinstance(node, ast.Try):
            g = guarded or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, g)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Site(module, path, node.lineno, alias.name, guarded))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target != "__future__":
                out.append(Site(module, path, node.lineno, target, guarded))
                for alias in node.names:  # `from pkg import submodule`
                    out.append(Site(module, path, node.lineno, f"{target}.{alias.name}", guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return out


class ImportGraph:
    """Every module of the cxr packages (and of tests/) with its import statements."""

    def __init__(self, package_dir: Dict[str, Path], extra_dirs: Tuple[Path, ...] = ()):
        self.modules: Dict[str, List[Site]] = {}
        for pkg, folder in package_dir.items():
            for f in sorted(folder.rglob("*.py")):
                parts = [pkg] + list(f.relative_to(folder).with_suffix("").parts)
                is_pkg = parts[-1] == "__init__"
                name = ".".join(parts[:-1] if is_pkg else parts)
                self.modules[name] = _sites(f, name, is_pkg)
        for folder in extra_dirs:  # flat folders of top-level modules (tests/)
            for f in sorted(folder.glob("*.py")):
                self.modules[f.stem] = _sites(f, f.stem, False)
        self.internal_tops = {m.split(".")[0] for m in self.modules}

    def modules_of(self, package: str) -> List[str]:
        return [m for m in self.modules if m == package or m.startswith(package + ".")]

    def _internal(self, target: str) -> List[str]:
        """The modules of ours that importing ``target`` runs: it and its parent packages."""
        parts = target.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in self.modules]

    def closure(self, roots: List[str], stop: Set[str] = frozenset()) -> Tuple[Set[str], List[Site]]:
        """Modules reached from ``roots`` through our own imports (not entering packages in
        ``stop``) and every import site of those modules."""
        seen: Set[str] = set()
        todo = list(roots)
        sites: List[Site] = []
        while todo:
            mod = todo.pop()
            if mod in seen:
                continue
            seen.add(mod)
            for site in self.modules[mod]:
                sites.append(site)
                if site.top in self.internal_tops and site.top not in stop:
                    todo.extend(self._internal(site.target))
        return seen, sites

    def third_party(self, sites: List[Site]) -> List[Site]:
        return [s for s in sites if s.top not in self.internal_tops and s.top not in sys.stdlib_module_names]


def providers(top: str) -> Set[str]:
    return PROVIDERS.get(top, {_norm(top)})


@pytest.fixture(scope="module")
def cfg() -> SetupCfg:
    return read_setup_cfg()


@pytest.fixture(scope="module")
def graph(cfg) -> ImportGraph:
    return ImportGraph(cfg.package_dir, (REPO / "tests",))


def _extra_sites(graph: ImportGraph, extra: str) -> Tuple[List[Site], List[str]]:
    """Third-party import sites reachable by an extra's packages, and the problems found with
    cross-extra imports (made outside the modules allowed to)."""
    problems: List[str] = []
    roots = [m for pkg in EXTRA_PACKAGES[extra] for m in graph.modules_of(pkg)]
    stop = {target for (pkg, target) in CROSS_EXTRA if pkg in EXTRA_PACKAGES[extra] and target in graph.internal_tops}
    _, sites = graph.closure(roots, stop)
    kept = []
    for s in sites:
        pkg = s.module.split(".")[0]
        cross = CROSS_EXTRA.get((pkg, s.top))
        if cross:
            if s.module not in cross[1]:
                problems.append(f"{s}: allowed only in {sorted(cross[1])} (it needs .[{cross[0]}])")
            continue
        kept.append(s)
    return graph.third_party(kept), problems


def test_package_dirs_are_the_six_packages(cfg):
    assert set(cfg.package_dir) == {"cxr_infer", "cxr_train", "cxr_export", "cxr_bench", "cxr_hospital", "cxr_serve"}
    for pkg, folder in cfg.package_dir.items():
        assert (folder / "__init__.py").is_file(), f"{pkg}: no {folder}/__init__.py"
    assert set(EXTRA_PACKAGES) - {""} <= set(cfg.extras)


def test_dependencies_point_one_way(cfg, graph):
    """No package imports a cxr package it may not: the runtime none, hospital integration only the
    runtime (its formats reach cxr-infer through entry points), and so on (MAY_IMPORT)."""
    assert set(MAY_IMPORT) == set(cfg.package_dir)
    bad = [str(s) for pkg in MAY_IMPORT for m in graph.modules_of(pkg) for s in graph.modules[m]
           if s.top in MAY_IMPORT and s.top != pkg and s.top not in MAY_IMPORT[pkg]]
    assert not bad, "\n".join(bad)


def test_base_install_is_the_lean_runtime(cfg):
    """DESIGN.md: `pip install .` installs only what the runtime needs."""
    assert cfg.base == {"onnxruntime", "numpy", "pillow"}


@pytest.mark.parametrize("extra", list(EXTRA_PACKAGES), ids=lambda e: e or "base")
def test_extra_brings_every_import_of_its_package(extra, cfg, graph):
    allowed = cfg.requires(extra)
    sites, problems = _extra_sites(graph, extra)
    for s in sites:
        if s.top in OPTIONAL:
            continue  # guarded, see test_optional_imports_are_guarded
        if not providers(s.top) & allowed:
            name = f".[{extra}]" if extra else "`pip install .`"
            problems.append(f"{s}, which {name} does not install (setup.cfg: add {sorted(providers(s.top))[0]})")
    assert not problems, "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("extra", [e for e in EXTRA_PACKAGES if e], ids=str)
def test_extra_requires_nothing_its_package_never_imports(extra, cfg, graph):
    sites, _ = _extra_sites(graph, extra)
    imported = set().union(*(providers(s.top) for s in sites))
    unused = cfg.extras[extra] - imported
    assert not unused, f".[{extra}] requires {sorted(unused)}, which nothing in {EXTRA_PACKAGES[extra]} imports"


def test_base_requires_nothing_the_runtime_never_imports(cfg, graph):
    sites, _ = _extra_sites(graph, "")
    imported = set().union(*(providers(s.top) for s in sites))
    assert cfg.base <= imported, sorted(cfg.base - imported)


def test_optional_imports_are_guarded_and_still_used(cfg, graph):
    uses: Dict[str, List[Site]] = {name: [] for name in OPTIONAL}
    for module, sites in graph.modules.items():
        if module.split(".")[0] not in cfg.package_dir:
            continue  # tests/ import what the test extra brings
        for s in sites:
            if s.top in uses:
                uses[s.top].append(s)
    for name, sites in uses.items():
        assert sites, f"OPTIONAL lists {name}, which nothing imports any more: drop it"
        for module in {s.module for s in sites}:
            assert any(s.guarded for s in sites if s.module == module), (
                f"{module} imports {name} without `try: ... except ImportError`; make it a requirement")
    for (pkg, target), _ in CROSS_EXTRA.items():
        made = {s.module for m in graph.modules_of(pkg) for s in graph.modules[m] if s.top == target}
        assert made, f"CROSS_EXTRA lists {pkg} -> {target}, which is not imported any more: drop it"


def test_cross_extra_paths_are_covered_by_the_named_extra(cfg, graph):
    """`cxr-bench latency --checkpoint` needs .[bench,train]: cxr_bench.worker's torch path
    (torch and cxr_train.checkpoint) is fully covered by those two extras together."""
    for (pkg, _target), (extra, modules) in CROSS_EXTRA.items():
        allowed = cfg.requires(extra) | cfg.requires(PACKAGE_EXTRA[pkg])
        roots = sorted(modules)
        _, sites = graph.closure(roots)
        missing = [str(s) for s in graph.third_party(sites)
                   if s.top not in OPTIONAL and not providers(s.top) & allowed]
        assert not missing, "\n".join(missing)


def _readme_test_command() -> str:
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()]
    cmds = [ln for ln in lines if ln.startswith("python3 -m pip install") and "pytest" in ln]
    assert len(cmds) == 1, f"README.md: expected one test command, found {cmds}"
    return cmds[0]


def test_test_command_installs_what_the_suite_imports(cfg, graph):
    """README's test command (installs .[train,bench,dicom,test]) covers every import of tests/
    and of the packages they exercise, cxr_export included (its extra is not installed)."""
    m = re.search(r'-e "\.\[([a-z,]+)\]"', _readme_test_command())
    assert m, "README's test command does not install the checkout with extras"
    allowed = cfg.base.union(*(cfg.extras[e] for e in m.group(1).split(",")))
    roots = [name for name in graph.modules if name.split(".")[0] not in cfg.package_dir]
    _, sites = graph.closure(roots)
    missing = sorted({f"{s} ({sorted(providers(s.top))[0]})" for s in graph.third_party(sites)
                      if s.top not in OPTIONAL and not providers(s.top) & allowed})
    assert not missing, "\n".join(missing)


def test_ci_runs_the_readme_test_command_last():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert commands[-1] == _readme_test_command()


# ---------------------------------------------------------------- the wheel


def _clean_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored): no
    build/ or egg-info leftovers, which setuptools would otherwise pack into the wheel."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", ".data", ".venv")
        shutil.copytree(REPO, dest, ignore=skip)
        return dest
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a path deleted but not yet staged is listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a clean copy of this checkout (a few seconds)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _clean_copy(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp / "dist")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("cxr-*.whl")
    return whl


def test_wheel_holds_the_packages_the_default_model_and_the_sample(wheel, cfg):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg, folder in cfg.package_dir.items():
        for f in folder.rglob("*.py"):
            rel = f"{pkg}/{f.relative_to(folder).as_posix()}"
            assert rel in names, f"the wheel lacks {rel}"
    assert "cxr_infer/models/default.onnx" in names
    assert "cxr_infer/models/README.md" in names
    for f in SAMPLES.iterdir():
        assert f"cxr_infer/samples/{f.name}" in names, f"the wheel lacks the bundled sample {f.name}"
    info = zipfile.ZipFile(wheel)
    entry_points = next(info.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for script in ("cxr-infer", "cxr-train", "cxr-export", "cxr-bench", "cxr-pacs", "cxr-node", "cxr-serve"):
        assert re.search(rf"^{script} = ", entry_points, re.M), f"no {script} console script"
    for fmt in ("dicom-sr", "fhir"):
        assert re.search(rf"^{fmt} = cxr_hospital\.", entry_points, re.M), f"no {fmt} output format entry point"
    assert re.search(r"^parquet = cxr_serve\.parquet:", entry_points, re.M), "no parquet output format entry point"
    assert re.search(r"^\[cxr\.runners\]\nray = cxr_serve\.ray_batch:RAY_RUNNER", entry_points, re.M), entry_points
    with info.open("cxr_infer/models/default.onnx") as f:
        assert f.read() == DEFAULT_MODEL.read_bytes()


def test_wheel_holds_no_tests_data_or_other_models(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"cxr_infer", "cxr_train", "cxr_export", "cxr_bench", "cxr_hospital", "cxr_serve"}, tops
    bad = [n for n in names if re.search(r"(^|/)(tests?|conftest\.py|results|runs|data)(/|$)", n)
           or (n.endswith(".onnx") and n != "cxr_infer/models/default.onnx")
           or (re.search(r"\.(jpe?g|png|dcm|bmp|tiff?)$", n) and not n.startswith("cxr_infer/samples/"))]
    assert not bad, bad
    assert os.path.getsize(wheel) < 40 * 2**20, f"the wheel is {os.path.getsize(wheel) / 2**20:.0f} MiB"


# ---------------------------------------------------------------- fresh virtual environments

needs_torch_switch = pytest.mark.skipif(
    os.environ.get("CXR_VENV_TORCH") != "1",
    reason="installs torch (5.5 GB) into a fresh venv: set CXR_VENV_TORCH=1")


needs_gpu_switch = pytest.mark.skipif(
    os.environ.get("CXR_VENV_GPU") != "1",
    reason="downloads onnxruntime-gpu from PyPI into a fresh venv: set CXR_VENV_GPU=1")


class Venv:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["VIRTUAL_ENV"] = str(root)
        self.env.setdefault("OMP_NUM_THREADS", "2")

    def run(self, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        exe = str(self.bin / args[0]) if (self.bin / args[0]).exists() else args[0]
        return subprocess.run([exe, *args[1:]], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def missing(self, *modules: str) -> List[str]:
        """Which of ``modules`` this venv cannot import."""
        code = ("import importlib.util as u, sys\n"
                "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))")
        r = self.run("python", "-c", code, *modules, cwd=self.root)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()


def make_venv(tmp: Path, wheel: Path, extra: str) -> Venv:
    root = tmp / f"venv-{extra or 'base'}"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    venv = Venv(root)
    spec = f"{wheel}[{extra}]" if extra else str(wheel)
    pins = TORCH_PINS if extra in ("train", "export") else []
    r = venv.run("python", "-m", "pip", "install", "-q", "--disable-pip-version-check", spec, *pins,
                 cwd=tmp, timeout=1800)
    assert r.returncode == 0, f"pip install {spec}: {r.stdout}{r.stderr}"
    r = venv.run("python", "-m", "pip", "check", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def _images(dest: Path, split: str, per_class: int) -> Path:
    src = SHARED / split
    if not (src / "NORMAL").is_dir():
        pytest.skip(f"shared data not found at {src}")
    for label in ("NORMAL", "PNEUMONIA"):
        (dest / label).mkdir(parents=True)
        for f in sorted((src / label).glob("*.jpeg"))[:per_class]:
            shutil.copy2(f, dest / label / f.name)
    return dest


def _dicom(path: Path) -> Path:
    """The bundled sample as an 8-bit MONOCHROME2 DX DICOM file (as tests/test_dicom.py builds them)."""
    pytest.importorskip("pydicom")
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    pixels = np.asarray(Image.open(SAMPLE).convert("L"))
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = dx, generate_uid(), "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dx, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


LABEL = re.compile(r"\b(PNEUMONIA|NORMAL)\b")


def check_base(venv: Venv, tmp: Path) -> None:
    r = venv.run("cxr-infer", str(SAMPLE), cwd=tmp)
    assert r.returncode == 0 and LABEL.search(r.stdout), r.stdout + r.stderr
    assert venv.run("cxr-infer", "--info", cwd=tmp).returncode == 0
    # the embedded default explains itself on a fresh install: an overlay PNG per input
    r = venv.run("cxr-infer", "--heatmap", str(tmp / "maps"), str(SAMPLE), cwd=tmp)
    assert r.returncode == 0 and (tmp / "maps" / (SAMPLE.stem + ".png")).is_file(), r.stderr
    # the lean runtime: nothing heavy came with it
    assert set(venv.missing("torch", "torchvision", "onnx", "matplotlib", "pydicom")) == {
        "torch", "torchvision", "onnx", "matplotlib", "pydicom"}
    # a DICOM input without the dicom extra: one line that says how to install it, exit 1
    r = venv.run("cxr-infer", str(_dicom(tmp / "x.dcm")), cwd=tmp)
    assert r.returncode == 1 and "cxr[dicom]" in r.stderr, r.stderr
    # SR output names its extra; FHIR output is plain JSON and needs none
    r = venv.run("cxr-infer", "--format", "dicom-sr", "--output", str(tmp / "sr"), str(tmp / "x.dcm"), cwd=tmp)
    assert r.returncode == 2 and "cxr[dicom]" in r.stderr, r.stderr
    r = venv.run("cxr-infer", "--format", "fhir", str(SAMPLE), cwd=tmp)
    assert r.returncode == 0 and '"resourceType": "Observation"' in r.stdout, r.stdout + r.stderr
    # the torch commands say which extra to install instead of a traceback
    r = venv.run("cxr-train", "--backbone", "tiny", "--data", str(tmp), "--out", str(tmp / "run"), cwd=tmp)
    assert r.returncode == 2 and "cxr[train]" in r.stderr, r.stderr
    r = venv.run("cxr-export", str(tmp / "run"), "--out", str(tmp / "m.onnx"), cwd=tmp)
    assert r.returncode == 2 and "cxr[export]" in r.stderr, r.stderr


def check_bench(venv: Venv, tmp: Path) -> None:
    data = _images(tmp / "data", "test", 4)
    out = tmp / "out"
    r = venv.run("cxr-bench", "accuracy", "--model", str(DEFAULT_MODEL), "--data", str(data), "--out", str(out),
                 cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "accuracy.md").is_file() and (out / "accuracy.json").is_file()
    assert not venv.missing("onnx", "matplotlib")
    assert set(venv.missing("torch", "pydicom", "skimage")) == {"torch", "pydicom", "skimage"}
    # domain with its default kinds, the extra alone (no scikit-image); no --out: a new folder here
    r = venv.run("cxr-bench", "domain", "--model", str(DEFAULT_MODEL), "--data", str(data), "--count", "3",
                 "--threads", "2", "-q", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    (folder,) = tmp.glob("cxr-bench-domain-*")
    kinds = json.loads((folder / "domain.json").read_text())["models"][0]["kinds"]
    assert len(kinds) == 10 and kinds["medical_other"]["sources"] == ["matplotlib:s1045.ima (MRI)"], kinds
    assert r.stdout.startswith("cxr-bench domain: ") and str(folder / "domain.md") in r.stdout


def check_dicom(venv: Venv, tmp: Path) -> None:
    r = venv.run("cxr-infer", str(_dicom(tmp / "sample.dcm")), cwd=tmp)
    assert r.returncode == 0 and LABEL.search(r.stdout), r.stdout + r.stderr
    # JPEG Lossless, as a PACS keeps CR and DX images: the extra's own GDCM decodes it
    from test_dicom import compress

    compress((tmp / "sample.dcm").read_bytes(), "JPEGLosslessProcess14_1", tmp / "lossless.dcm")
    r = venv.run("cxr-infer", str(tmp / "lossless.dcm"), cwd=tmp)
    assert r.returncode == 0 and LABEL.search(r.stdout), r.stdout + r.stderr
    assert set(venv.missing("torch", "onnx")) == {"torch", "onnx"}
    # --format dicom-sr: _dicom's file has no study, which an SR must name: one line, exit 1
    r = venv.run("cxr-infer", "--format", "dicom-sr", "--output", str(tmp / "sr"), str(tmp / "sample.dcm"), cwd=tmp)
    assert r.returncode == 1 and "lacks StudyInstanceUID" in r.stderr and "Traceback" not in r.stderr, r.stderr


def check_pacs(venv: Venv, tmp: Path) -> None:
    r = venv.run("cxr-pacs", "--help", cwd=tmp)
    assert r.returncode == 0 and "--once" in r.stdout, r.stdout + r.stderr
    r = venv.run("cxr-pacs", "--url", "http://127.0.0.1:9", "--once", cwd=tmp)  # nothing listens on port 9
    assert r.returncode == 2 and "Orthanc is not reachable" in r.stderr, r.stderr
    assert not venv.missing("pydicom", "highdicom")
    assert set(venv.missing("torch", "onnx")) == {"torch", "onnx"}


def check_node(venv: Venv, tmp: Path) -> None:
    r = venv.run("cxr-node", "--help", cwd=tmp)
    assert r.returncode == 0 and "--send-to-dicomweb" in r.stdout, r.stdout + r.stderr
    r = venv.run("cxr-node", "--status", str(tmp / "none"), cwd=tmp)
    assert r.returncode == 2 and "holds no cxr-node job table" in r.stderr, r.stderr
    assert not venv.missing("pynetdicom", "pydicom", "highdicom")
    assert set(venv.missing("torch", "onnx")) == {"torch", "onnx"}


def check_train(venv: Venv, tmp: Path) -> None:
    data = _images(tmp / "data", "train", 16)
    run = tmp / "run"
    r = venv.run("cxr-train", "--backbone", "tiny", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--workers", "2", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "checkpoint.json").is_file()
    assert set(venv.missing("onnx", "matplotlib")) == {"onnx", "matplotlib"}


def check_export(venv: Venv, tmp: Path) -> None:
    data = _images(tmp / "data", "train", 16)
    run = tmp / "run"
    # a checkpoint from this checkout's cxr-train (the export extra alone has no tqdm)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("runtime", "train")))
    r = subprocess.run([sys.executable, "-m", "cxr_train.cli", "--backbone", "tiny", "--data", str(data),
                        "--out", str(run), "--epochs", "1", "--image-size", "64", "--batch-size", "8",
                        "--device", "cpu", "--no-progress"], cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp / "tiny.onnx"
    r = venv.run("cxr-export", str(run), "--out", str(out), "--int8", "--calibration", str(data),
                 "--calibration-count", "16", "--force", "--threads", "2", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    int8 = tmp / "tiny_int8.onnx"  # cxr-export: OUT's stem + _int8.onnx
    assert int8.is_file(), sorted(p.name for p in tmp.iterdir())
    for model in (out, int8):
        r = venv.run("cxr-infer", "--model", str(model), str(SAMPLE), cwd=tmp)
        assert r.returncode == 0 and LABEL.search(r.stdout), r.stdout + r.stderr
    assert set(venv.missing("tqdm", "matplotlib")) == {"tqdm", "matplotlib"}  # train's and bench's, not export's


def check_gpu(venv: Venv, tmp: Path) -> None:
    """``pip install '.[gpu]'`` alone leaves the CPU build in charge: onnxruntime and
    onnxruntime-gpu share the ``onnxruntime/`` folder and the CPU wheel's files win, so no CUDA
    provider. The documented fix (README, setup.cfg): reinstall onnxruntime-gpu's files on top."""
    code = "import onnxruntime as o; print(' '.join(o.get_available_providers()))"
    r = venv.run("python", "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "onnxruntime-gpu", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    r = venv.run("python", "-c", code, cwd=tmp)
    assert r.returncode == 0 and "CUDAExecutionProvider" in r.stdout.split(), r.stdout + r.stderr
    r = venv.run("cxr-infer", str(SAMPLE), cwd=tmp)  # and the CPU still works where no GPU is
    assert r.returncode == 0 and LABEL.search(r.stdout), r.stdout + r.stderr


def check_serve(venv: Venv, tmp: Path) -> None:
    """``.[serve]`` alone: cxr-serve answers /v1/classify over HTTP; --ray names its extra."""
    import urllib.request

    log = tmp / "serve.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([str(venv.bin / "cxr-serve"), "--port", "0", "--threads", "1"], stdout=fh,
                             stderr=subprocess.STDOUT, env=venv.env, cwd=tmp)
    try:
        for _ in range(600):
            found = re.search(r" on (http://127\.0\.0\.1:\d+)", log.read_text())
            if found or p.poll() is not None:
                break
            time.sleep(0.1)
        assert found, log.read_text()
        with urllib.request.urlopen(found.group(1) + "/v1/classify", data=SAMPLE.read_bytes(), timeout=60) as r:
            assert LABEL.search(json.loads(r.read())["label"])
    finally:
        p.terminate()
        assert p.wait(30) == 0, log.read_text()
    r = venv.run("cxr-serve", "--ray", "127.0.0.1:9", cwd=tmp)
    assert r.returncode == 2 and "cxr[ray]" in r.stderr, r.stderr
    assert set(venv.missing("ray", "pyarrow", "torch")) == {"ray", "pyarrow", "torch"}


CHECKS = {"gpu": check_gpu, "": check_base, "bench": check_bench, "dicom": check_dicom, "pacs": check_pacs,
          "train": check_train, "export": check_export, "serve": check_serve}
CHECKS["node"] = check_node


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    pytest.param("", id="base"),
    pytest.param("bench", id="bench"),
    pytest.param("dicom", id="dicom"),
    pytest.param("pacs", id="pacs"),
    pytest.param("node", id="node"),
    pytest.param("serve", id="serve"),
    pytest.param("train", id="train", marks=needs_torch_switch),
    pytest.param("export", id="export", marks=needs_torch_switch),
    pytest.param("gpu", id="gpu", marks=needs_gpu_switch),
])
def test_fresh_venv_runs_the_extras_own_command(extra, wheel, tmp_path):
    try:
        venv = make_venv(tmp_path, wheel, extra)
        work = tmp_path / "work"
        work.mkdir()
        CHECKS[extra](venv, work)
    finally:  # a torch venv is 5.5 GB: never leave it among pytest's kept temporary folders
        shutil.rmtree(tmp_path / f"venv-{extra or 'base'}", ignore_errors=True)
