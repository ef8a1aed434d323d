"""`memssl reproduce --executor submitit` and `train_encoders(..., executor='submitit')` with submitit's local executor
(what submitit picks where there is no SLURM): the jobs are real processes, and the results are the local runner's."""
import json
from pathlib import Path

import pytest
import torch

from memssl_nb import registry
from memssl_nb import runner
from memssl_nb import report
from memssl_nb.cli import main
from memssl_nb.data import load_dataset
from memssl_nb.spec import TrainSpec
from memssl_nb.train import train_encoder
from memssl_nb.jobs import train_encoders, submitit_executor

FIXTURES = Path(__file__).parent/'fixtures'/'paper'


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv('MEMSSL_PROGRESS', '0')
    monkeypatch.setenv('MEMSSL_THREADS', '1')
    for mod in (registry, report, runner): monkeypatch.setattr(mod, 'package_hash', lambda package_dir=None: 'pinned-package-hash')


def test_auto_executor_is_local_without_slurm(tmp_path):
    assert submitit_executor(tmp_path).cluster == 'local'


def test_reproduce_two_artifacts_as_submitit_jobs(tmp_path, capsys):
    reg = tmp_path/'registry.json'
    registry.save_registry([registry.Artifact('ok_a', 'Fixture', 'a fitted line', 'ok_artifact.ipynb',
                                params={'smoke': {'artifact_ids': ['ok_a'], 'slope': 2.0}}),
                     registry.Artifact('ok_b', 'Fixture', 'another line', 'ok_artifact.ipynb',
                                params={'smoke': {'artifact_ids': ['ok_b'], 'slope': 3.0}})], reg)
    out = tmp_path/'figures'
    code = main(['reproduce', '--scale', 'smoke', '--executor', 'submitit', '--jobs', '2', '--registry', str(reg),
                 '--nb-root', str(FIXTURES), '--out-root', str(out)])
    assert code == 0, capsys.readouterr()
    assert '2 ran, 0 skipped, 0 failed' in capsys.readouterr().out
    sd = out/'smoke'
    for aid, slope in [('ok_a', 2.0), ('ok_b', 3.0)]:
        claims = json.loads((sd/f'{aid}.claims.json').read_text())['claims']
        assert [c['verdict'] for c in claims] == ['holds', 'contradicted', 'not checkable']
        assert abs(claims[0]['ours'] - slope) < 0.05                      # the injected parameter reached the kernel
        assert (sd/f'{aid}.png').exists() and (sd/'.stamps'/f'{aid}.json').exists()
    logs = list((sd/'.submitit').rglob('*_log.out'))
    assert len(logs) == 2                                                 # two jobs, each with its own log
    df = registry.list_artifacts(scale='smoke', out_root=out, registry=reg, nb_root=FIXTURES)
    assert df.status.tolist() == ['done', 'done']                         # the local runner agrees: nothing to redo
    assert '| Fixture | 2 | 2 | 0 | 0 | 0 |' in (sd/'REPORT.md').read_text()


def test_train_encoders_as_submitit_jobs(tmp_path, monkeypatch):
    # one thread here and in the jobs (they inherit MEMSSL_THREADS): float reductions then run in the same order,
    # so the weights must be bit-identical (with different thread counts Adam amplifies rounding differences)
    monkeypatch.setenv('MEMSSL_THREADS', '1')
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try: _train_encoders_as_jobs(tmp_path)
    finally: torch.set_num_threads(threads)

def _train_encoders_as_jobs(tmp_path):
    digits = load_dataset('digits', size=16)
    specs = [TrainSpec(indices=tuple(range(128)), epochs=2, batch_size=64, seed=s) for s in (0, 1)]
    trained = train_encoders(specs, digits, executor='submitit', cache_dir=tmp_path)
    assert len(list((tmp_path/'submitit').rglob('*_result.pkl'))) == 2   # trained by two jobs ...
    assert all(t.from_cache for t in trained)                            # ... and handed back through the cache
    here = train_encoder(specs[1], digits, cache=False, progress_bar=False)
    for a, b in zip(trained[1].encoder.state_dict().values(), here.encoder.state_dict().values()):
        assert torch.equal(a, b)                                         # same machine, same weights as in-process
    assert not torch.equal(trained[0].encoder.state_dict()['conv1.conv.weight'], here.encoder.state_dict()['conv1.conv.weight'])
