"""The GPU bundle's dependency closure, offline: what the GPU run imports is carried or in the GPU image.

benchmarks/check_bundle.py runs the same closure on built wheels (after benchmarks/gpu_bundle.sh downloads
them); here the carried packages' metadata comes from this environment, which has the very versions the
bundle carries. A new import, lazy or not, of a package that is neither carried nor in the GPU image fails
here, and so does a carried package nothing needs any more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bundle_closure as closure


@pytest.fixture(scope="module")
def imports() -> dict[str, list[closure.Importer]]:
    return closure.gpu_imports()  # a subprocess imports the GPU entry points (torch, DeepSpeed: seconds)


def carried(names: list[str] | None = None) -> list[closure.Carried]:
    return closure.carried_from_installed(names or closure.read_list(closure.BUNDLE_LIST))


def test_the_gpu_run_needs_only_carried_or_image_packages_and_every_carried_one(imports, capsys):
    problems = closure.closure_problems(carried(), closure.read_image_packages(), imports)
    assert problems == [], "\n".join([*problems, capsys.readouterr().out])


def test_imports_inside_functions_and_modules_reached_only_through_them_count(imports):
    where = {module: {i.path for i in importers} for module, importers in imports.items()}
    assert (
        "sparsebert/train/distributed.py" in where["deepspeed"]
    )  # the trainer's, reached from pretrain.main
    lazy = {(i.path, i.lazy) for i in imports["sklearn"]}
    assert lazy == {("eval/metrics.py", True)}  # imported when a metric is first computed
    assert ("eval/finetune.py", False) in {(i.path, i.lazy) for i in imports["numpy"]}  # at module level


def test_a_package_neither_carried_nor_in_the_image_is_named_with_its_importer(imports):
    without_deepspeed = [n for n in closure.read_list(closure.BUNDLE_LIST) if n != "deepspeed"]
    problems = closure.closure_problems(
        carried(without_deepspeed), closure.read_image_packages(), imports, False
    )
    missing = [p for p in problems if "needs deepspeed: neither carried nor in the GPU image" in p]
    assert missing and missing[0].startswith("sparsebert/")
    # What only deepspeed needed is now carried for nothing.
    assert any(p.startswith("hjson 3.1") and "nothing the GPU run imports needs it" in p for p in problems)


def test_a_module_level_import_of_a_package_kept_off_the_gpu_is_a_problem(imports):
    """NOT_ON_GPU excuses lazy imports only: a module-level one runs whenever the GPU run imports its module."""
    definite = {**imports, "mlflow": [closure.Importer("sparsebert/train/trainer.py", 1, lazy=False)]}
    problems = closure.closure_problems(carried(), closure.read_image_packages(), definite, False)
    assert problems == [
        "sparsebert/train/trainer.py:1 (import mlflow) needs mlflow: neither carried nor in the GPU image"
    ]
