"""Every registered artifact's parameters, at every scale, are variables its notebook's `parameters` cell defines:
papermill would add a misspelt name as a new variable that nothing reads, so a paper-scale setting could be ignored
without an error on a GPU machine that CI never sees."""
import pytest
from memssl_nb.registry import load_registry, PAPER_NB_ROOT, SCALES, check_parameters, notebook_parameters

REGISTRY = load_registry()


def test_registry_is_not_empty():
    assert len(REGISTRY) >= 20


@pytest.mark.parametrize('artifact_id', sorted(REGISTRY))
def test_parameters_exist_in_the_notebook(artifact_id):
    a = REGISTRY[artifact_id]
    nb = PAPER_NB_ROOT / a.notebook
    assert nb.exists(), nb
    assert {'scale', 'out_dir'} <= set(notebook_parameters(nb))      # what the runner injects
    for scale in SCALES: check_parameters(a, scale, PAPER_NB_ROOT)


@pytest.mark.parametrize('artifact_id', sorted(REGISTRY))
def test_notebook_names_its_kernel_and_takes_scale_and_overrides(artifact_id):
    "papermill refuses a notebook without a kernelspec ('No language found'); every setting arrives as `overrides`."
    import json
    nb = json.loads((PAPER_NB_ROOT / REGISTRY[artifact_id].notebook).read_text())
    assert nb['metadata'].get('kernelspec', {}).get('language') == 'python'
    assert notebook_parameters(PAPER_NB_ROOT / REGISTRY[artifact_id].notebook) == ['scale', 'out_dir', 'overrides']
    assert all(set(p) <= {'overrides'} for p in REGISTRY[artifact_id].params.values())


def test_outside_a_clone_the_error_says_where_memssl_looks(tmp_path):
    "`memssl list` run outside any clone: exit 2 and a message naming settings.ini and MEMSSL_HOME, not a bare path."
    import os, subprocess, sys
    from pathlib import Path
    import memssl_nb
    env = {k: v for k, v in os.environ.items() if k != 'MEMSSL_HOME'}
    env['PYTHONPATH'] = str(Path(memssl_nb.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, '-c', 'import sys; from memssl_nb.cli import main; sys.exit(main(["list"]))'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert 'does not exist: memssl finds its project (the folder holding settings.ini)' in r.stderr
    assert 'set MEMSSL_HOME' in r.stderr and 'Traceback' not in r.stderr
