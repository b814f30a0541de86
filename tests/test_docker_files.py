"""docker/ agrees with pyproject.toml: entry point, Python, extras and pinned versions, and the
KubeRay manifest with the images and the engine's config. (Docker itself does not run here.)"""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _name(req: str) -> str:
    """Normalised distribution name of a requirement string (``ray[default]>=2.30`` -> ``ray``)."""
    return re.split(r"[\[<>=!~; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"docker/constraints.txt: {line!r} is not pinned with =="
            pins[_name(name)] = version.strip()
    return pins


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


DOCKERFILES = {"Dockerfile.cpu": {"cluster", "ml"}, "Dockerfile.cuda": {"gpu", "cluster"}}


def test_console_script_is_the_cli():
    import importlib

    assert PROJECT["scripts"]["nightsift"] == "nightsift.engine.cli:main"
    mod, _, func = PROJECT["scripts"]["nightsift"].partition(":")
    assert callable(getattr(importlib.import_module(mod), func))


def test_pins_cover_and_satisfy_pyproject():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins()
    reqs = list(PROJECT["dependencies"]) + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    for r in reqs:
        req = Requirement(r)
        name = _name(req.name)
        assert name in pins, f"docker/constraints.txt does not pin {name} (pyproject: {r})"
        assert Version(pins[name]) in req.specifier, f"{name}=={pins[name]} violates pyproject's {r}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_base_install_and_entrypoint(name):
    from packaging.specifiers import SpecifierSet

    ins = _instructions(_dockerfile(name))
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"python:(3\.11\.\d+)-slim-(\w+)", froms[0])
    assert m, f"{name}: base image {froms[0]!r} is not a pinned python:3.11.x-slim image"
    assert m.group(1) in SpecifierSet(PROJECT["requires-python"])
    # the package is installed from the copied sources, with its extras, under the constraints
    copied = " ".join(a for k, a in ins if k == "COPY")
    for src in ("pyproject.toml", "engine", "kernels", "docker/constraints.txt"):
        assert re.search(rf"(^| ){re.escape(src)}( |$)", copied), f"{name} does not COPY {src}"
    pip = [a for k, a in ins if k == "RUN" and "pip install" in a]
    assert len(pip) == 1
    words = shlex.split(pip[0].split("&&")[0])
    assert "--constraint" in words and words[words.index("--constraint") + 1].endswith("constraints.txt")
    target = next(w for w in words if w.startswith(".["))
    extras = set(target[2:-1].split(","))
    assert extras == DOCKERFILES[name] and extras <= set(PROJECT["optional-dependencies"])
    # image-only packages must be pinned too
    pins = _pins()
    for w in words[2:]:
        if not w.startswith(("-", ".")) and not w.endswith("constraints.txt"):
            assert _name(w) in pins, f"{name}: {w} is not pinned in docker/constraints.txt"
    entry = [a for k, a in ins if k == "ENTRYPOINT"]
    assert entry == ['["nightsift"]'], f"{name}: the entry point must be the nightsift console script"
    cmd = [a for k, a in ins if k == "CMD"]
    from nightsift.engine.cli import build_parser

    build_parser().parse_args(__import__("json").loads(cmd[-1]))  # a valid nightsift command line


def test_raycluster_manifest():
    yaml = pytest.importorskip("yaml")
    m = yaml.safe_load((DOCKER / "raycluster.yaml").read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster"
    spec = m["spec"]
    assert spec["rayVersion"] == _pins()["ray"]  # the images' Ray, as the cluster requires
    version = PROJECT["version"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs the driver and writer only
    assert head["template"]["spec"]["containers"][0]["image"] == f"nightsift:{version}-cpu"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"subtraction", "inference"}
    sub = groups["subtraction"]
    c = sub["template"]["spec"]["containers"][0]
    assert c["image"] == f"nightsift:{version}-cuda"
    assert sub["rayStartParams"]["num-gpus"] == "1" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    inf = groups["inference"]
    c = inf["template"]["spec"]["containers"][0]
    assert c["image"] == f"nightsift:{version}-cpu" and "nvidia.com/gpu" not in c["resources"]["limits"]
    import json

    resources = json.loads(yaml.safe_load(inf["rayStartParams"]["resources"]))
    # the engine places inference actors with run.inference_resource; the manifest says which
    from nightsift.engine.config import load_config

    text = (DOCKER / "raycluster.yaml").read_text()
    key = re.search(r'inference_resource = "(\w+)"', text).group(1)
    assert key in resources and load_config(None, run={"inference_resource": key}).run.inference_resource == key
    # the command in the comments is a valid nightsift command line
    line = re.search(r"--\s*\\\n#\s+(nightsift .*)", text).group(1)
    from nightsift.engine.cli import build_parser

    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command == "run" and args.address == "auto"
