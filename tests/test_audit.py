"""`memssl audit` end to end: torchvision and timm encoders (random weights, nothing downloaded), checkpoints in three
layouts and a training checkpoint with more than tensors, an image folder; the report's numbers against the engine called directly; a clear error for each bad input;
and the protocol's own SSLMem ranking reproduced from files."""
import contextlib, io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.stats import spearmanr

from memssl_nb.audit import audit_augment, build_architecture, load_images
from memssl_nb.cli import main
from memssl_nb.layermem import layermem
from memssl_nb.sslmem import sslmem
from memssl_nb.unitmem import unitmem, classmem

torch.set_num_threads(1)


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(['audit', *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "An ImageFolder-layout folder: 2 classes x 8 RGB 32 px images with class-dependent structure."
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for c, name in enumerate(('cats', 'dogs')):
        (root / name).mkdir()
        for i in range(8):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            img[:, : 8 + 8 * c] //= 2
            Image.fromarray(img).save(root / name / f'{i:02d}.png')
    return root


def save_layouts(model, folder: Path) -> dict[str, Path]:
    "The same weights as a bare state dict, safetensors, and a DDP/SSL training checkpoint with a projector."
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = {'plain': folder / 'plain.pt', 'safetensors': folder / 'model.safetensors', 'ssl': folder / 'ssl.ckpt'}
    torch.save(sd, paths['plain'])
    save_file(sd, str(paths['safetensors']))
    torch.save({'epoch': 99, 'state_dict': {**{f'module.backbone.{k}': v for k, v in sd.items()},
                                            'module.projector.0.weight': torch.randn(8, 8)},
                'optimizer': {'lr': 0.1}}, paths['ssl'])
    return paths


def test_torchvision_resnet18_three_layouts(folder, tmp_path):
    torch.manual_seed(0)
    f, g = build_architecture('torchvision/resnet18'), build_architecture('torchvision/resnet18')
    (tmp_path / 'f').mkdir(); (tmp_path / 'g').mkdir()
    fp, gp = save_layouts(f, tmp_path / 'f'), save_layouts(g, tmp_path / 'g')
    layers = ['layer2.1', 'layer3.1', 'layer4.1']
    imgs = load_images(folder)
    aug = audit_augment('ssl_normal', imgs.images)
    f.eval(); g.eval()
    want_unit = unitmem(f, imgs.images, aug, layers, n_views=3, progress=False).table()
    want_class = classmem(f, imgs.images, imgs.labels, layers, progress=False).table()
    want_ssl = sslmem(f, g, imgs.images, aug, n_pairs=2, progress=False).score.numpy()
    want_lm = layermem(f, g, imgs.images, aug, layers, n_pairs=2, progress=False).layermem()
    for layout in ('plain', 'safetensors', 'ssl'):
        out = tmp_path / f'report_{layout}'
        code, stdout, err = run_cli('--arch', 'torchvision/resnet18', '--checkpoint', fp[layout], '--reference', gp[layout],
                                    '--images', folder, '--out', out, '--layers', ','.join(layers), '--n-views', 3,
                                    '--n-pairs', 2)
        assert code == 0, err
        assert 'report:' in stdout
        units = pd.read_csv(out / 'units.csv')
        np.testing.assert_allclose(units.unitmem, want_unit.score, atol=1e-6)
        live = (want_unit.mu_max > 0).to_numpy()                  # a dead unit (no image activates it) has no owner
        np.testing.assert_array_equal(units.owner[live], want_unit.owner[live])
        assert units.owner[~live].isna().all() and (units.dead == ~live).all()
        np.testing.assert_allclose(units.classmem, want_class.score, atol=1e-6)
        images = pd.read_csv(out / 'images.csv').sort_values('image')
        np.testing.assert_allclose(images.sslmem, want_ssl, atol=1e-6)
        layer_rows = pd.read_csv(out / 'layers.csv').set_index('layer')
        np.testing.assert_allclose(layer_rows.layermem[layers], want_lm[layers], atol=1e-6)
        assert images.file.tolist()[:2] == ['cats/00.png', 'cats/01.png']
        md, page = (out / 'report.md').read_text(), (out / 'report.html').read_text()
        assert 'most_memorized_images.png' in md and page.count('data:image/png;base64,') == 6
    assert "prefix 'state_dict.module.backbone.'" in md   # the SSL layout was read under its prefix


def test_timm_vit(folder, tmp_path):
    torch.manual_seed(1)
    vit = build_architecture('timm/vit_tiny_patch16_224', img_size=32, patch_size=8)
    torch.save({'model': vit.state_dict()}, tmp_path / 'vit.pth')
    code, stdout, err = run_cli('--arch', 'timm/vit_tiny_patch16_224', '--model-kw', 'img_size=32', '--model-kw',
                                'patch_size=8', '--checkpoint', tmp_path / 'vit.pth', '--images', folder, '--out',
                                tmp_path / 'r', '--n-views', 2, '--max-images', 10, '--no-labels')
    assert code == 0, err
    layers = pd.read_csv(tmp_path / 'r' / 'layers.csv')
    assert layers.layer.tolist() == [f'blocks.{i}' for i in range(12)]
    assert (layers.units == 192).all()
    imgs = load_images(folder, max_images=10)
    vit.eval()
    want = unitmem(vit, imgs.images, audit_augment('ssl_normal', imgs.images), ['blocks.0', 'blocks.11'], n_views=2,
                   progress=False).table()
    units = pd.read_csv(tmp_path / 'r' / 'units.csv')
    got = units[units.layer.isin(['blocks.0', 'blocks.11'])]
    np.testing.assert_allclose(got.unitmem, want.score, atol=1e-5)
    assert 'classmem' not in units and len(pd.read_csv(tmp_path / 'r' / 'images.csv')) == 10


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
    "The wrong files the cases below point at, written once (the two checkpoints are 96 MB together)."
    root = tmp_path_factory.mktemp('bad_inputs')
    paths = {'r34': root / 'r34.pt', 'partial': root / 'partial.pt', 'junk': root / 'junk.pt',
             'empty': root / 'empty', 'broken': root / 'broken', 'nowhere': root / 'nowhere', 'cut': root / 'cut.pt',
             'pickled': root / 'pickled.pt'}
    torch.save(build_architecture('torchvision/resnet34').state_dict(), paths['r34'])
    sd = build_architecture('torchvision/resnet18').state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith('layer4')}, paths['partial'])
    paths['junk'].write_bytes(b'\x00garbage')
    paths['cut'].write_bytes(paths['partial'].read_bytes()[:4096])
    import fractions
    torch.save({'state_dict': sd, 'ratio': fractions.Fraction(1, 3)}, paths['pickled'])
    paths['empty'].mkdir()
    paths['broken'].mkdir(); (paths['broken'] / 'bad.png').write_bytes(b'not an image')
    return paths


@pytest.mark.parametrize('case, argv, message', [
    ('unknown architecture', ['--arch', 'torchvision/resnet81'], 'did you mean'),
    ('unknown source', ['--arch', 'keras/resnet18'], 'unknown architecture source'),
    ('checkpoint of another architecture', ['--arch', 'torchvision/resnet18', '--checkpoint', '{r34}'], 'does not fit'),
    ('checkpoint missing tensors', ['--arch', 'torchvision/resnet18', '--checkpoint', '{partial}'], 'missing'),
    ('not a checkpoint', ['--arch', 'torchvision/resnet18', '--checkpoint', '{junk}'], 'is not a checkpoint'),
    ('truncated checkpoint', ['--arch', 'torchvision/resnet18', '--checkpoint', '{cut}'], 'cannot be read as a torch file'),
    ('objects beyond tensors', ['--arch', 'torchvision/resnet18', '--checkpoint', '{pickled}'], 'fractions.Fraction), and unpickling them runs code'),
    ('empty folder', ['--arch', 'torchvision/resnet18', '--images', '{empty}'], 'no images'),
    ('unreadable image', ['--arch', 'torchvision/resnet18', '--images', '{broken}'], 'bad.png'),
    ('wrong channel count', ['--arch', 'torchvision/resnet18', '--channels', '1'], '--channels 3'),
    ('unknown layer', ['--arch', 'torchvision/resnet18', '--layers', 'layer5.0'], 'layer4.1'),
    ('not a folder or dataset', ['--arch', 'torchvision/resnet18', '--images', '{nowhere}'], 'neither an image folder'),
])
def test_bad_input(case, argv, message, folder, bad_inputs, tmp_path):
    argv = [a.format(**bad_inputs) for a in argv]
    if '--images' not in argv: argv += ['--images', str(folder)]
    code, _, err = run_cli(*argv, '--out', tmp_path / 'out', '--n-views', 1)
    assert code == 2, (case, err)
    assert message in err, (case, err)
    assert 'Traceback' not in err


def test_protocol_ranking_reproduced(tmp_path):
    "An audit of a library-trained digits encoder with its g ranks the candidates as the protocol's own scoring does."
    from memssl_nb.protocol import protocol_config, run_protocol
    from memssl_nb.sslmem_experiments import score_run
    cfg = protocol_config('smoke')
    run = run_protocol(cfg, progress_bar=False)
    cand = run.split.sets()['S_C']
    own = score_run(run, n_pairs=10, sets=('S_C',)).score.to_numpy()
    (tmp_path / 'cand').mkdir()
    for j, i in enumerate(cand.tolist()):
        Image.fromarray(run.data.images[i, 0].numpy()).save(tmp_path / 'cand' / f'{j:04d}.png')
    f_ck, g_ck = run.f[0].path / 'final.safetensors', run.g[0].path / 'final.safetensors'
    code, _, err = run_cli('--arch', 'memssl/resnet9', '--model-kw', f'width={cfg.width}', '--checkpoint', f_ck,
                           '--reference', g_ck, '--images', tmp_path / 'cand', '--augment', cfg.augment,
                           '--n-pairs', 10, '--n-views', 2, '--out', tmp_path / 'r')
    assert code == 0, err
    audited = pd.read_csv(tmp_path / 'r' / 'images.csv').sort_values('image').sslmem.to_numpy()
    rho = spearmanr(audited, own).statistic
    assert rho >= 0.99, rho


def test_training_checkpoints(folder, tmp_path):
    """A DINO-style checkpoint (argparse arguments, a NumPy number, the weights under 'student.module.backbone.') loads
    as it is; one with another Python object is refused, and loads with --trust-checkpoint."""
    import argparse, fractions
    sd = build_architecture('torchvision/resnet18').state_dict()
    torch.save({'args': argparse.Namespace(arch='resnet18', lr=5e-4), 'epoch': 100, 'best': np.float64(0.5),
                'student': {f'module.backbone.{k}': v for k, v in sd.items()}}, tmp_path / 'dino.pth')
    torch.save({'state_dict': sd, 'ratio': fractions.Fraction(1, 3)}, tmp_path / 'pickled.pth')
    common = ['--arch', 'torchvision/resnet18', '--images', folder, '--list-layers']
    code, out, err = run_cli(*common, '--checkpoint', tmp_path / 'dino.pth')
    assert code == 0 and 'layer4' in out, err
    assert run_cli(*common, '--checkpoint', tmp_path / 'pickled.pth')[0] == 2
    code, out, err = run_cli(*common, '--checkpoint', tmp_path / 'pickled.pth', '--trust-checkpoint')
    assert code == 0 and 'layer4' in out, err
