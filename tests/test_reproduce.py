"""End to end tests of `memssl reproduce` with a real Jupyter kernel (papermill) on fixture notebooks.

Kernel start-up dominates the run time, so one module-scoped run (three artifacts, two at a time) is shared
and later tests work on copies of its output folder; only one more notebook is executed after it (the
resumed run); skip decisions are checked with a recording stand-in for papermill.
"""
import json, shutil
from pathlib import Path

import pytest

from memssl_nb import claims
from memssl_nb import registry
from memssl_nb import report
from memssl_nb import runner
from memssl_nb.cli import main

FIXTURES = Path(__file__).parent/'fixtures'/'paper'
CLAIM_KEYS = ['statement', 'paper_value', 'ours', 'test', 'p_value', 'p_against', 'verdict', 'why']


@pytest.fixture(autouse=True, scope='module')
def _pinned_package_hash():
    """Quiet bars, and a fixed package hash: other chapters' sources may be re-exported while these tests run,
    which would (rightly) make every stamp stale."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('MEMSSL_PROGRESS', '0')
        for mod in (registry, report, runner): mp.setattr(mod, 'package_hash', lambda package_dir=None: 'pinned-package-hash')
        yield mp


def fixture_registry(slope_b=3.0):
    return [registry.Artifact('ok_a', 'Fixture', 'a fitted line', 'ok_artifact.ipynb',
                       params={'smoke': {'artifact_ids': ['ok_a'], 'slope': 2.0}}),
            registry.Artifact('ok_b', 'Fixture', 'a line and an extra claim set', 'ok_artifact.ipynb',
                       params={'smoke': {'artifact_ids': ['ok_b', 'ok_b-extra'], 'slope': slope_b}},
                       ids=('ok_b', 'ok_b-extra')),
            registry.Artifact('bad', 'Broken', 'a notebook that raises', 'failing_artifact.ipynb'),
            registry.Artifact('after_bad', 'Broken', 'depends on the failing one', 'ok_artifact.ipynb',
                       params={'smoke': {'artifact_ids': ['after_bad']}}, depends_on=('bad',))]


def run(out_root, arts=None, **kw):
    return runner.reproduce('smoke', out_root=out_root, registry=arts or fixture_registry(), nb_root=FIXTURES, **kw)


def env_recorder(env_key: str, folder: str):
    "(the list it fills, a stand-in for papermill that records each job's `env_key` and whether its out_dir is under `folder`)."
    seen = []
    def record(job):
        seen.append((job.env[env_key], folder in job.parameters['out_dir'])); return 'RuntimeError: not executed'
    return seen, record


def statuses(out_root, arts=None):
    df = registry.list_artifacts(scale='smoke', out_root=out_root, registry=arts or fixture_registry(), nb_root=FIXTURES)
    return dict(zip(df.id, df.status))


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
    "One real smoke run of all fixture artifacts, two notebooks at a time."
    out_root = tmp_path_factory.mktemp('baseline')
    summary = run(out_root, jobs=2)
    return out_root, summary


@pytest.fixture
def copy_of(baseline, tmp_path):
    shutil.copytree(baseline[0], tmp_path/'figures')
    return tmp_path/'figures'


def test_smoke_run_end_to_end(baseline):
    out_root, s = baseline
    sd = out_root/'smoke'
    assert {r.id: r.status for r in s.results} == {'ok_a': 'done', 'ok_b': 'done', 'bad': 'failed', 'after_bad': 'failed'}
    assert s.exit_code == 1 and s.failed == ['bad', 'after_bad']
    for f in ['ok_a.png', 'ok_a.csv', 'ok_a.claims.json', 'ok_b.png', 'ok_b.csv', 'ok_b.claims.json',
              'ok_b-extra.claims.json', 'executed/ok_a.ipynb', 'executed/ok_b.ipynb', 'executed/bad.ipynb']:
        assert (sd/f).exists(), f
    assert (sd/'ok_a.png').read_bytes()[:4] == b'\x89PNG'
    # claims JSON schema, verdicts derived from the measurement, injected parameters reached the notebook
    for aid, slope in [('ok_a', 2.0), ('ok_b', 3.0), ('ok_b-extra', 3.0)]:
        d = json.loads((sd/f'{aid}.claims.json').read_text())
        assert list(d) == ['artifact', 'claims'] and d['artifact'] == aid
        assert [list(c) for c in d['claims']] == [CLAIM_KEYS] * 3
        assert [c['verdict'] for c in d['claims']] == ['holds', 'contradicted', 'not checkable']
        assert d['claims'][0]['paper_value'] == slope and abs(d['claims'][0]['ours'] - slope) < 0.05
        assert d['claims'][2]['why'] == 'fixture notebook at smoke scale'
    executed = json.loads((sd/'executed/ok_b.ipynb').read_text())
    injected = [c for c in executed['cells'] if 'injected-parameters' in c['metadata'].get('tags', [])]
    assert len(injected) == 1 and "out_dir = " in ''.join(injected[0]['source'])
    # stamps only for the artifacts that completed; failures recorded with the executed notebook
    assert sorted(p.name for p in (sd/'.stamps').glob('*.json')) == [
        'after_bad.failed.json', 'bad.failed.json', 'ok_a.json', 'ok_b.json']
    rec = json.loads((sd/'.stamps/bad.failed.json').read_text())
    assert rec['error'].startswith('RuntimeError: deliberate failure') and rec['executed'].endswith('executed/bad.ipynb')
    assert 'dependency bad failed' in s['after_bad'].error and not (sd/'executed/after_bad.ipynb').exists()
    assert statuses(out_root) == {'ok_a': 'done', 'ok_b': 'done', 'bad': 'failed', 'after_bad': 'failed'}
    # the report
    report = (sd/'REPORT.md').read_text()
    assert '| Fixture | 2 | 2 | 0 | 0 | 0 | 9 | 3 | 3 | 0 | 3 |' in report
    assert '| Broken | 2 | 0 | 0 | 2 | 0 | 0 | 0 | 0 | 0 | 0 |' in report
    assert '| **all** | 4 | 2 | 0 | 2 | 0 | 9 | 3 | 3 | 0 | 3 |' in report
    assert '![ok_a: a fitted line](ok_a.png)' in report and '| x | y |' in report
    assert '| The fitted slope is positive | 2 | 1.995 | least squares | — | — | **holds** | — |' in report   # seed 0
    assert '| Holds on CIFAR-10 | — | — | — | — | — | **not checkable** | fixture notebook at smoke scale |' in report
    assert '#### ok_b-extra' in report
    failed = report[report.index('## Failed artifacts'):]
    assert 'RuntimeError: deliberate failure' in failed and '[executed/bad.ipynb](executed/bad.ipynb)' in failed
    assert 'not run: dependency bad failed' in failed


def test_skip_unchanged_and_parameter_change(copy_of):
    s = run(copy_of, only='ok_*')                                    # nothing changed: nothing runs
    assert s.skipped == ['ok_a', 'ok_b'] and s.ran == [] and s.exit_code == 0
    changed = fixture_registry(slope_b=5.0)
    assert statuses(copy_of, changed) == {'ok_a': 'done', 'ok_b': 'stale', 'bad': 'failed', 'after_bad': 'failed'}
    asked = []
    def record(job):                                                 # which notebooks would the runner execute?
        asked.append(job.artifact_id); return 'RuntimeError: not executed in this test'
    run(copy_of, changed, only='ok_*', execute=record)
    assert asked == ['ok_b']
    asked.clear(); run(copy_of, changed, only='ok_a', force=True, execute=record)
    assert asked == ['ok_a']


def test_package_or_notebook_change_makes_stale(copy_of, _pinned_package_hash, tmp_path):
    assert statuses(copy_of)['ok_a'] == 'done'
    for mod in (registry, report, runner): _pinned_package_hash.setattr(mod, 'package_hash', lambda package_dir=None: 'edited-package')
    try: assert statuses(copy_of) == {'ok_a': 'stale', 'ok_b': 'stale', 'bad': 'failed', 'after_bad': 'failed'}
    finally:
        for mod in (registry, report, runner): _pinned_package_hash.setattr(mod, 'package_hash', lambda package_dir=None: 'pinned-package-hash')
    nb_root = tmp_path/'nbs'; shutil.copytree(FIXTURES, nb_root)
    nb = json.loads((nb_root/'ok_artifact.ipynb').read_text())
    nb['cells'][-1]['source'].append('\nprint("edited")')
    (nb_root/'ok_artifact.ipynb').write_text(json.dumps(nb))
    df = registry.list_artifacts(scale='smoke', out_root=copy_of, registry=fixture_registry(), nb_root=nb_root)
    assert dict(zip(df.id, df.status))['ok_a'] == 'stale'


def test_force_interrupt_and_resume(copy_of):
    sd = copy_of/'smoke'
    before = (sd/'.stamps/ok_a.json').stat().st_mtime_ns
    calls = []
    def interrupt_second(job):
        "ok_a completes (its notebook rewrites its claims, without a kernel to save time); Ctrl-C during ok_b."
        calls.append(job.artifact_id)
        if len(calls) == 2: raise KeyboardInterrupt
        claims.ClaimSet.load(sd/'ok_a.claims.json').save(job.parameters['out_dir'])
    with pytest.raises(KeyboardInterrupt):
        run(copy_of, only='ok_*', force=True, jobs=1, execute=interrupt_second)
    assert calls == ['ok_a', 'ok_b']                                   # force re-ran the unchanged ok_a
    assert (sd/'.stamps/ok_a.json').stat().st_mtime_ns > before
    assert not (sd/'.stamps/ok_b.json').exists()                       # ok_b did not complete: no stamp
    assert statuses(copy_of)['ok_b'] == 'not run here'        # its claims are an earlier run's
    assert '| Fixture | 2 | 1 | 0 | 0 | 1 |' in (sd/'REPORT.md').read_text()   # report rebuilt on interrupt
    # resume (real kernel): only ok_b runs, with a new parameter that reaches the notebook
    s = run(copy_of, fixture_registry(slope_b=5.0), only='ok_*')
    assert s.skipped == ['ok_a'] and s.ran == ['ok_b'] and s.exit_code == 0
    assert abs(json.loads((sd/'ok_b.claims.json').read_text())['claims'][0]['ours'] - 5.0) < 0.05
    assert statuses(copy_of, fixture_registry(slope_b=5.0))['ok_b'] == 'done'


def test_cli_list_report_reproduce(copy_of, tmp_path, capsys):
    reg = tmp_path/'registry.json'
    registry.save_registry(fixture_registry(), reg)
    loc = ['--registry', str(reg), '--nb-root', str(FIXTURES), '--out-root', str(copy_of)]
    assert main(['list', '--scale', 'smoke', *loc]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ['ok_a', 'ok_b', 'bad', 'after_bad']) and '2 done' in out and '2 failed' in out
    (copy_of/'smoke'/'REPORT.md').unlink()
    assert main(['report', '--scale', 'smoke', *loc]) == 0
    assert '![ok_a: a fitted line](ok_a.png)' in (copy_of/'smoke'/'REPORT.md').read_text()
    assert main(['reproduce', '--scale', 'smoke', '--only', 'ok_*', *loc]) == 0          # unchanged: no kernel
    assert '0 ran, 2 skipped, 0 failed' in capsys.readouterr().out
    assert main(['list', '--scale', 'cpu', *loc]) == 0 and 'n/a' in capsys.readouterr().out
    registry.save_registry(fixture_registry() + [registry.Artifact('gone', 'Broken', 'x', 'missing.ipynb')], reg)
    assert main(['reproduce', '--scale', 'smoke', '--only', 'ok_*,gone', *loc]) == 1
    assert 'FAILED gone: notebook not found' in capsys.readouterr().out


def test_python3_kernel_is_visible():
    assert Path(runner.check_kernel('python3')).exists()
    from jupyter_client.kernelspec import KernelSpecManager
    native = KernelSpecManager(kernel_dirs=[]).get_kernel_spec('python3')   # no spec files at all: ipykernel's own
    assert native.argv[1:3] == ['-m', 'ipykernel_launcher']


def test_wall_clock_guard_kills_the_run(tmp_path):
    job = runner.NotebookJob('bad', FIXTURES/'failing_artifact.ipynb', tmp_path/'executed'/'bad.ipynb',
                        {'scale': 'smoke', 'out_dir': str(tmp_path)}, cwd=tmp_path, wall_timeout=0.5)
    error = runner.run_papermill(job)
    assert error.startswith('timed out after') and not runner._ACTIVE


def test_seed_offset_run_is_kept_apart_and_compared(copy_of, tmp_path, monkeypatch):
    "`--seed-offset 100`: the notebooks get the offset (and only the one asked for), the outputs go to their own folder,"
    " and both reports show how many verdicts the two runs share."
    from memssl_nb.core import SEED_OFFSET_ENV
    monkeypatch.setenv(SEED_OFFSET_ENV, '7')                         # left in the shell: must not reach the notebooks
    seen, record = env_recorder(SEED_OFFSET_ENV, 'seed-offset-100')
    run(copy_of, only='ok_a', force=True, execute=record, seed_offset=100)
    run(copy_of, only='ok_a', force=True, execute=record)
    assert seen == [('100', True), ('0', False)]
    with pytest.raises(ValueError, match='≥ 0'): run(copy_of, only='ok_a', execute=record, seed_offset=-1)
    # a finished run with other seeds: the same outputs with one verdict flipped
    other = copy_of/'seed-offset-100'/'smoke'; shutil.rmtree(other); shutil.copytree(copy_of/'smoke', other)
    claims_file = other/'ok_a.claims.json'
    d = json.loads(claims_file.read_text()); d['claims'][0]['verdict'] = 'contradicted'; claims_file.write_text(json.dumps(d))
    reg = tmp_path/'registry.json'; registry.save_registry(fixture_registry(), reg)
    loc = ['--scale', 'smoke', '--registry', str(reg), '--nb-root', str(FIXTURES), '--out-root', str(copy_of)]
    assert main(['report', *loc]) == 0 and main(['report', '--seed-offset', '100', *loc]) == 0
    base, shifted = (copy_of/'smoke'/'REPORT.md').read_text(), (other/'REPORT.md').read_text()
    assert '## Stability: seeds shifted by 0 against 100' in base and '## Stability: seeds shifted by 100 against 0' in shifted
    n = len(d['claims']) + sum(len(json.loads(p.read_text())['claims']) for p in other.glob('ok_b*.claims.json'))
    assert f'| {n - 1} ({(n - 1) / n:.1%}) | 1 |' in shifted and d['claims'][0]['statement'] in shifted
    assert main(['report', '--seed-offset', '-2', *loc]) == 2


def test_budget_run_is_kept_apart_and_set_beside(copy_of, tmp_path, monkeypatch):
    "`--budget width=0.25`: the notebooks get the budget (and only the one asked for), the outputs go to their own folder,"
    " and the report of the run at the presets' own budget sets each claim that does not hold beside the same claim there."
    from memssl_nb.core import BUDGET_ENV
    monkeypatch.setenv(BUDGET_ENV, '{"epochs": 1}')                 # left in the shell: must not reach the notebooks
    seen, record = env_recorder(BUDGET_ENV, 'budget-width-0.25')
    run(copy_of, only='ok_a', force=True, execute=record, budget={'width': 0.25})
    run(copy_of, only='ok_a', force=True, execute=record)
    assert seen == [('{"width": 0.25}', True), ('{}', False)]
    with pytest.raises(ValueError, match="'width'"): run(copy_of, only='ok_a', execute=record, budget={'wdth': 0.25})
    with pytest.raises(ValueError, match='seed_offset'): run(copy_of, only='ok_a', execute=record, budget={'width': 0.25}, seed_offset=100)
    # a finished smaller run: the same outputs, where the claim that does not hold here had a larger p
    smaller = copy_of/'budget-width-0.25'/'smoke'; shutil.rmtree(smaller); shutil.copytree(copy_of/'smoke', smaller)
    here, there = copy_of/'smoke'/'ok_a.claims.json', smaller/'ok_a.claims.json'
    d = json.loads(here.read_text()); d['claims'][0].update(verdict='inconclusive', p_value=0.2, p_against=0.8); here.write_text(json.dumps(d))
    d['claims'][0].update(p_value=0.6, p_against=0.4); there.write_text(json.dumps(d))
    reg = tmp_path/'registry.json'; registry.save_registry(fixture_registry(), reg)
    loc = ['--scale', 'smoke', '--registry', str(reg), '--nb-root', str(FIXTURES), '--out-root', str(copy_of)]
    assert main(['report', *loc]) == 0 and main(['report', '--budget', 'width=0.25', *loc]) == 0
    base = (copy_of/'smoke'/'REPORT.md').read_text()
    assert '## The effect at two budgets: `width-0.25` → this run' in base and '`memssl reproduce --scale smoke --budget width=0.25`' in base
    assert 'toward the paper' in base and (smaller/'REPORT.md').exists()
    assert main(['report', '--budget', 'width', *loc]) == 2 and main(['report', '--budget', 'width=0.25', '--seed-offset', '100', *loc]) == 2


def test_budget_factor_reaches_every_preset(copy_of, monkeypatch):
    "`--budget epochs=0.5x`: the notebooks get the factor, the outputs go to budget-epochs-0.5x, a factor on a setting that is not a training length is an error."
    from memssl_nb.core import BUDGET_ENV
    seen, record = env_recorder(BUDGET_ENV, 'budget-epochs-0.5x')
    run(copy_of, only='ok_a', force=True, execute=record, budget={'epochs': '0.5x'})
    assert seen == [('{"epochs": "0.5x"}', True)]
    with pytest.raises(ValueError, match="only \\['epochs'\\]"): run(copy_of, only='ok_a', execute=record, budget={'width': '0.5x'})
    assert main(['list', '--scale', 'smoke', '--budget', 'epochs=0.5x', '--budget', 'width=2x']) == 2


def test_paper_notebooks_run_without_warnings(tmp_path, monkeypatch):
    """The paper notebooks whose code paths warned until 2026-12-06 (importing tqdm.auto without ipywidgets, `float()` of a
    loss with a graph, a read-only pandas array in a tensor) run at smoke scale with warnings shown, and print none.
    The project's encoder cache serves them: `nbdev_test` trained the same smoke encoders when it ran these notebooks."""
    monkeypatch.setenv('PYTHONWARNINGS', 'default')          # the test command hides warnings; here they must show
    s = runner.reproduce('smoke', only='LOC-T21,SSLMem-SETS,LOB-F1', jobs=2, out_root=tmp_path, compare=None,
                         report=False, verbose=False)
    assert s.exit_code == 0, s.table()
    warned = []
    for nb in sorted((tmp_path / 'smoke' / 'executed').glob('*.ipynb')):
        for cell in json.loads(nb.read_text())['cells']:
            for out in cell.get('outputs', []):
                if out.get('name') == 'stderr':
                    warned += [f'{nb.name}: {line}' for line in ''.join(out['text']).splitlines() if 'Warning' in line]
    assert len(list((tmp_path / 'smoke' / 'executed').glob('*.ipynb'))) == 3 and not warned, warned
