"""The paper-scale rehearsal (`memssl reproduce --scale paper --rehearse`, chapters 00, 01 and 22): every preset shrunk
by one rule per setting name, generated CIFAR/SVHN/STL files, an encoder cache of its own, and nothing leaking into a
real run. The whole rehearsal (21 notebooks) runs on demand; CI runs the subset `CI_SUBSET` through real kernels."""
import importlib
from pathlib import Path

import pytest

from memssl_nb import runner
from memssl_nb.cli import main
from memssl_nb.core import REHEARSAL_ENV, Preset, unclassified_settings
from memssl_nb.data import GENERATED_MANIFEST, DatasetNotFound, load_dataset, clear_dataset_cache

STUDIES = ('protocol', 'lobacheva', 'localizing', 'sslmem_experiments', 'zhangcao')
# a ResNet-9 SimCLR protocol (LayerMem), a ViT-Tiny MAE (attention vs MLP), a supervised ResNet-9 beside SimCLR on
# generated CIFAR-10: the three model families of the paper scale, about a minute on two cores
CI_SUBSET = 'LOC-T1,LOC-T2,SSLMem-SETS'


def presets():
    for m in STUDIES: importlib.import_module(f'memssl_nb.{m}')
    def subclasses(c):
        for s in c.__subclasses__(): yield s; yield from subclasses(s)
    return [(cls, scale, cfg) for cls in subclasses(Preset) for scale, cfg in cls.SCALES.items()]


def test_every_numeric_setting_has_a_rehearsal_rule():
    "A setting neither capped nor kept would reach a rehearsal at full size: every one of every preset is classified."
    found = presets()
    assert {cls.__name__ for cls, *_ in found} >= {'ProtocolConfig', 'LobachevaConfig', 'LocT21Config', 'ZhangCaoConfig'}
    unclassified = {f'{cls.__name__}[{scale}]': u for cls, scale, cfg in found if (u := unclassified_settings(cfg))}
    assert not unclassified, f"add these settings to REHEARSAL_CAPS or REHEARSAL_KEEPS in chapter 00: {unclassified}"


def test_paper_presets_shrink_only_in_a_rehearsal(monkeypatch):
    from memssl_nb.protocol import ProtocolConfig
    from memssl_nb.localizing import LocT21Config
    from memssl_nb.lobacheva import LobachevaConfig
    paper = ProtocolConfig.preset('paper')
    monkeypatch.setenv(REHEARSAL_ENV, '1')
    small = ProtocolConfig.preset('paper')
    assert (small.epochs, small.batch_size, small.seeds, small.n_extra) == (1, 16, (0, 1), 24)
    # what decides shapes and code paths is the paper's
    assert (small.dataset, small.image_size, small.arch, small.width, small.objective, small.augment, small.lr) == \
           (paper.dataset, paper.image_size, paper.arch, paper.width, paper.objective, paper.augment, paper.lr)
    t21 = LocT21Config.preset('paper')
    assert (t21.epochs, t21.sl_epochs, t21.ft_epochs, t21.datasets, t21.grid) == (1, 1, 1, ['cifar10', 'stl10'], True)
    assert set(LobachevaConfig.preset('paper').epochs.values()) == {1} and LobachevaConfig.preset('paper').arch == 'resnet18'
    monkeypatch.setenv(REHEARSAL_ENV, '0')
    assert ProtocolConfig.preset('paper') == paper and paper.epochs == 600


def test_rehearsal_environment_and_no_leak(tmp_path, monkeypatch):
    "The notebooks of a rehearsal see the flag, the generated data and their own cache; a real run never sees the flag,"
    " even when it is left set in the shell."
    monkeypatch.setenv(REHEARSAL_ENV, '1')
    seen = []
    def record(job):
        seen.append((job.env[REHEARSAL_ENV], job.env.get('MEMSSL_DATA'), job.parameters['out_dir'])); return 'RuntimeError: not executed'
    s = runner.reproduce('paper', only='SSLMem-F10', out_root=tmp_path, execute=record, verbose=False, rehearse=True)
    root = (tmp_path/'rehearsal').resolve()
    assert seen[-1] == ('1', str(root/'data'), str(root/'paper'/'.staging'/'SSLMem-F10'))
    assert (root/'data'/GENERATED_MANIFEST).exists() and not (root/'paper'/'REPORT.md').exists()
    assert '| SSLMem-F10 | failed |' in (root/'paper'/'REHEARSAL.md').read_text() and s.comparison is None
    runner.reproduce('smoke', only='SSLMem-F10', out_root=tmp_path, execute=record, verbose=False, report=False, compare=None)
    assert seen[-1][0] == '0' and seen[-1][2].startswith(str((tmp_path/'smoke').resolve()))
    with pytest.raises(ValueError, match='seed_offset'):
        runner.reproduce('paper', out_root=tmp_path, execute=record, rehearse=True, seed_offset=100)
    # outside a rehearsal its generated files are an error, never a dataset
    monkeypatch.setenv(REHEARSAL_ENV, '0'); clear_dataset_cache()
    with pytest.raises(DatasetNotFound, match='generated random images for a rehearsal'):
        load_dataset('cifar10', root=root/'data')


def test_paper_rehearsal_ci_subset(tmp_path, capsys):
    "Real kernels at the paper scale's code paths: ResNet-9 SimCLR, ViT-Tiny MAE and supervised training on generated CIFAR-10."
    code = main(['reproduce', '--scale', 'paper', '--rehearse', '--only', CI_SUBSET, '--jobs', '2', '--out-root', str(tmp_path)])
    out = capsys.readouterr().out
    md = (tmp_path/'rehearsal'/'paper'/'REHEARSAL.md').read_text()
    assert code == 0, out + md
    for a in CI_SUBSET.split(','): assert f'| {a} | done |' in md
    assert '3 ran, 0 skipped, 0 failed; rehearsal:' in out
    from memssl_nb.registry import package_hash
    cache = tmp_path/'rehearsal'/'cache'/package_hash()[:16]          # encoders went to the rehearsal's own cache
    assert any(cache.rglob('final.safetensors'))
    assert not (tmp_path/'paper').exists()                           # and no output to the real paper-scale folder
