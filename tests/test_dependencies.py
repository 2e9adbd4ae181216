"""The declared dependencies match the code: each one is used, each import is declared, floors are what the code needs.

Reads pyproject.toml and the installed distributions' metadata only; installs nothing and imports none of them.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "teachers", "student")  # what the wheel ships: runtime dependencies serve these

# Distribution name -> top-level import name, where they differ beyond "-" vs "_".
IMPORT_NAMES = {
    "pyyaml": "yaml",
    "pillow": "PIL",
    "scikit-image": "skimage",
    "huggingface-hub": "huggingface_hub",
}
# Runtime dependencies the code needs without importing them: dist -> (file, text that shows the use).
INDIRECT = {
    # accelerate's TensorBoard tracker (the student's default `trackers: [tensorboard]`) imports it.
    "tensorboard": ("student/config.py", 'Literal["tensorboard"]'),
}
# Modules imported by the code that come with a declared distribution rather than being declared themselves.
PROVIDED_BY = {"pydantic_core": "pydantic"}  # pydantic pins its own pydantic-core exactly

# The lowest version of each dependency that has the APIs the code uses.
NEEDED_FLOORS = {
    # transformers 5.4: the image-processor backend refactor (transformers#43514) added the <Model>ImageProcessorPil
    # classes (CLIPImageProcessorPil, OneFormerImageProcessorPil) and AutoImageProcessor.from_pretrained(backend="pil").
    "transformers": "5.4",
    # zarr 3.1.0: `zarr.core.dtype` (ZDType, data_type_registry, npy.float.BaseFloat) that pipeline/data/zarr_bfloat16.py
    # subclasses and registers bfloat16 with.
    "zarr": "3.1",
    # diffusers 0.40: `DiffusionPipeline.from_pretrained(dtype=...)` (earlier releases take `torch_dtype`, which 0.40
    # deprecates), used by the unCLIP decoder in teachers/kinds/unclip.py. 0.36 was the first with huggingface-hub 1.x.
    "diffusers": "0.40",
    # timm 1.0.16: the `local-dir:PATH` model source that teachers/kinds/timm_features.py creates models from.
    "timm": "1.0.16",
}
# Versions the project is run with that the declared ranges must keep admitting.
MUST_ADMIT = {"torch": "2.14.1", "torchvision": "0.29.1"}


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _runtime() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _project()["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _dev() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _project().get("optional-dependencies", {}).get("dev", [])]
    return {canonicalize_name(r.name): r for r in reqs}


def _import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist.replace("-", "_"))


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> files (relative) in PACKAGES that import it, absolute imports only."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _floor(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_every_runtime_dependency_is_used_by_the_code():
    imported = _imported_modules()
    for dist, req in _runtime().items():
        if dist in INDIRECT:
            file, evidence = INDIRECT[dist]
            assert evidence in (ROOT / file).read_text(), (
                f"{dist}: declared for an indirect use ({evidence!r} in {file}) that is no longer there")
            continue
        module = _import_name(dist)
        assert module in imported, (
            f"{dist}: declared in [project.dependencies] but `{module}` is imported nowhere in "
            f"{', '.join(PACKAGES)}/ (remove it, move it to an extra, or add it to IMPORT_NAMES/INDIRECT)")
        assert not req.extras, f"{dist}: extras {sorted(req.extras)} are declared; declare only what the code uses"


def test_every_third_party_import_is_declared():
    declared = {_import_name(dist) for dist in _runtime()}
    for module, files in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        provider = PROVIDED_BY.get(module)
        if provider is not None:
            assert canonicalize_name(provider) in _runtime(), f"{module}: comes with {provider}, which is not declared"
            continue
        assert module in declared, f"{module}: imported by {sorted(files)} but no runtime dependency provides it"


@pytest.mark.parametrize("group", ["runtime", "dev"])
def test_installed_versions_satisfy_the_declared_specifiers(group):
    reqs = _runtime() if group == "runtime" else _dev()
    for dist, req in reqs.items():
        try:
            installed = version(dist)
        except PackageNotFoundError:
            pytest.fail(f"{dist}: declared ({req}) but not installed in this environment")
        assert req.specifier.contains(installed, prereleases=True), (
            f"{dist}: installed {installed} does not satisfy the declared {req}")


def test_floors_are_at_least_what_the_code_needs():
    runtime = _runtime()
    for dist, needed in NEEDED_FLOORS.items():
        assert dist in runtime, f"{dist}: the code needs >={needed} but it is not a declared runtime dependency"
        floor = _floor(runtime[dist])
        assert floor is not None and floor >= Version(needed), (
            f"{dist}: declared {runtime[dist]} admits versions below {needed}, the lowest with the APIs the code uses")


def test_ranges_admit_the_versions_the_project_runs_with():
    runtime = _runtime()
    for dist, pinned in MUST_ADMIT.items():
        assert runtime[dist].specifier.contains(pinned, prereleases=True), (
            f"{dist}: declared {runtime[dist]} no longer admits {pinned}")
