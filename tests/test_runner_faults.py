"""Fault injection on the runner: a killed `memssl reproduce` leaves no process and no half-written artifact; unusable
registries and output folders are messages with a non-zero exit, never tracebacks or empty successes; the report
counts only what ran here."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import psutil
import pytest

from memssl_nb import claims
from memssl_nb import registry
from memssl_nb import report
from memssl_nb import runner
from memssl_nb.cli import main

FIXTURES = Path(__file__).parent / 'fixtures' / 'paper'


def slow_notebook(folder: Path) -> Path:
    "A paper-notebook stand-in that writes its claims only after 60 s."
    nb = {'cells': [{'cell_type': 'code', 'metadata': {'tags': ['parameters']}, 'execution_count': None, 'outputs': [],
                     'source': "scale = 'smoke'\nout_dir = '.'"},
                    {'cell_type': 'code', 'metadata': {}, 'execution_count': None, 'outputs': [],
                     'source': "import time\ntime.sleep(60)\nfrom memssl_nb.claims import ClaimSet\n"
                               "ClaimSet('slow').save(out_dir)"}],
          'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
          'nbformat': 4, 'nbformat_minor': 5}
    path = folder / 'slow.ipynb'; path.write_text(json.dumps(nb)); return path


def test_sigkill_of_the_runner_leaves_no_orphans_and_no_outputs(tmp_path):
    slow_notebook(tmp_path)
    registry.save_registry([registry.Artifact('slow', 'Fixture', 'sleeps', 'slow.ipynb')], tmp_path / 'registry.json')
    script = textwrap.dedent(f'''
        from memssl_nb.runner import reproduce
        reproduce('smoke', registry={str(tmp_path / 'registry.json')!r}, out_root={str(tmp_path / 'figures')!r},
                  verbose=False, compare=None)
    ''')
    runner = subprocess.Popen([sys.executable, '-c', script], env=dict(os.environ, MEMSSL_PROGRESS='0'))
    family = []
    deadline = time.time() + 60
    while time.time() < deadline:                                   # wait until the kernel runs the notebook
        family = psutil.Process(runner.pid).children(recursive=True)
        if any('ipykernel' in ' '.join(p.cmdline()) for p in family if p.is_running()): break
        time.sleep(0.5)
    assert any('ipykernel' in ' '.join(p.cmdline()) for p in family), 'the kernel never started'
    time.sleep(2)
    runner.send_signal(signal.SIGKILL); runner.wait()
    gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    sd = tmp_path / 'figures' / 'smoke'
    assert not (sd / 'slow.claims.json').exists() and not list((sd / '.stamps').glob('slow.json'))


def run_cli(*argv):
    return main(list(map(str, argv)))


def test_a_missing_registry_is_an_error(tmp_path, capsys):
    assert run_cli('reproduce', '--scale', 'smoke', '--registry', tmp_path / 'missing.json') == 2
    assert 'missing.json does not exist' in capsys.readouterr().err
    assert run_cli('list', '--registry', tmp_path / 'missing.json') == 2
    assert run_cli('report', '--registry', tmp_path / 'missing.json') == 2


def test_a_broken_default_registry_does_not_break_other_registries(tmp_path):
    home = tmp_path / 'home'; (home / 'nbs' / 'paper').mkdir(parents=True)
    (home / 'nbs' / 'paper' / 'registry.json').write_text('{"artifacts": [')           # broken default registry
    good = tmp_path / 'good.json'
    registry.save_registry([registry.Artifact('ok_a', 'Fixture', 'a line', 'ok_artifact.ipynb')], good)
    env = dict(os.environ, MEMSSL_HOME=str(home), MEMSSL_PROGRESS='0')
    ok = subprocess.run([sys.executable, '-m', 'memssl_nb.cli', 'list', '--scale', 'smoke', '--registry', str(good),
                         '--nb-root', str(FIXTURES), '--out-root', str(tmp_path / 'figures')],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and 'ok_a' in ok.stdout, ok.stderr
    broken = subprocess.run([sys.executable, '-m', 'memssl_nb.cli', 'list'], env=env, capture_output=True, text=True)
    assert broken.returncode == 2 and 'not valid JSON' in broken.stderr and 'registry.json' in broken.stderr
    assert 'Traceback' not in broken.stderr


def test_an_unwritable_output_folder_is_an_error(tmp_path, capsys):
    good = tmp_path / 'good.json'
    registry.save_registry([registry.Artifact('ok_a', 'Fixture', 'a line', 'ok_artifact.ipynb')], good)
    (tmp_path / 'figures').mkdir(); (tmp_path / 'figures' / 'smoke').write_text('a file where the folder should be')
    code = run_cli('reproduce', '--scale', 'smoke', '--registry', good, '--nb-root', FIXTURES, '--out-root', tmp_path / 'figures')
    assert code == 2 and 'cannot write the outputs' in capsys.readouterr().err


def fake_execute(job):
    cs = claims.ClaimSet(job.artifact_id); cs.check('one is positive', ours=1, condition=True, exact=True); cs.save(job.parameters['out_dir'])


def test_report_counts_only_done_artifacts_and_a_failed_report_fails_the_run(tmp_path, monkeypatch):
    arts = [registry.Artifact('A', 'P', 'a', 'ok_artifact.ipynb'), registry.Artifact('B', 'P', 'b', 'ok_artifact.ipynb')]
    run = lambda **kw: runner.reproduce('smoke', registry=arts, nb_root=FIXTURES, out_root=tmp_path, execute=fake_execute,
                                   verbose=False, compare=None, **kw)
    assert run().exit_code == 0
    md = (tmp_path / 'smoke' / 'REPORT.md').read_text()
    assert '| **all** | 2 | 2 | 0 | 0 | 0 | 2 | 2 | 0 | 0 | 0 |' in md
    (tmp_path / 'smoke' / '.stamps' / 'B.json').unlink()                      # B's outputs are no longer vouched for
    md = report.write_report('smoke', tmp_path, registry=arts, nb_root=FIXTURES).read_text()
    assert '| **all** | 2 | 1 | 0 | 0 | 1 | 1 | 1 | 0 | 0 | 0 |' in md
    assert 'Claims from an earlier run (status not run here): shown, not counted above.' in md
    def broken(*a, **k): raise OSError(30, 'Read-only file system')
    monkeypatch.setattr(runner, 'write_report', broken)   # what the runner calls
    s = run(only='A', force=True)
    assert s.report_error and s.exit_code == 1


def test_staged_outputs_move_into_place_only_on_success(tmp_path):
    arts = [registry.Artifact('A', 'P', 'a', 'ok_artifact.ipynb')]
    def half(job):
        (Path(job.parameters['out_dir']) / 'A.png').write_bytes(b'half a figure')
        return 'RuntimeError: died after the figure (cell 3)'
    s = runner.reproduce('smoke', registry=arts, nb_root=FIXTURES, out_root=tmp_path, execute=half, verbose=False, compare=None)
    assert s.failed == ['A'] and not (tmp_path / 'smoke' / 'A.png').exists()
    assert not list((tmp_path / 'smoke' / '.staging').glob('*'))


def test_report_gives_each_claim_that_does_not_hold_its_verdict_at_the_smaller_budget(tmp_path):
    arts = [registry.Artifact('A', 'P', 'a', 'ok_artifact.ipynb')]
    def execute(job):
        cs = claims.ClaimSet('A')
        cs.check('the slope is positive', ours=0.5, p_value=0.2, test='t-test')
        cs.check('one is positive', ours=1, condition=True, exact=True)
        cs.save(job.parameters['out_dir'])
    smaller = tmp_path / 'budget-width-0.25' / 'smoke'; smaller.mkdir(parents=True)
    then = claims.ClaimSet('A'); then.check('the slope is positive', ours=0.1, p_value=0.6, test='t-test'); then.save(smaller)
    s = runner.reproduce('smoke', registry=arts, nb_root=FIXTURES, out_root=tmp_path, execute=execute, verbose=False, compare=None)
    assert s.exit_code == 0
    rows = (tmp_path / 'smoke' / 'REPORT.md').read_text().splitlines()
    slope = next(r for r in rows if r.startswith('| the slope is positive'))
    assert ('at `width-0.25`: inconclusive (p 0.6, p against 0.4); here: inconclusive (p 0.2, p against 0.8): '
            'toward the paper |') in slope
    assert 'width-0.25' not in next(r for r in rows if r.startswith('| one is positive'))   # a claim that holds needs no reason
