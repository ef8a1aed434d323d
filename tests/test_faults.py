"""Fault injection on the training cache: every case here once gave a silently wrong result or a raw traceback
(the table in tests/README.md says what happened before and what happens now)."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memssl_nb.objectives import OBJECTIVES
from memssl_nb.data import load_dataset, make_split
from memssl_nb.spec import TrainSpec
from memssl_nb.checkpoint import CheckpointError, checkpoint_bytes, read_checkpoint
from memssl_nb.train import train_encoder, cached_encoders
import memssl_nb.train as train_module

torch.set_num_threads(1)

SCRIPT = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from memssl_nb.objectives import OBJECTIVES
    from memssl_nb.data import load_dataset
    from memssl_nb.spec import TrainSpec
    from memssl_nb.train import train_encoder
    name, cache, out = sys.argv[1:4]
    kill_epoch, log = int(os.environ.get('KILL_EPOCH', '0')), os.environ.get('EPOCH_LOG')
    armed = []
    cls = OBJECTIVES[name]; original = cls.after_step
    def after_step(self):
        original(self)
        if armed: os.kill(os.getpid(), 9)        # SIGKILL after the first step of the next epoch: mid-epoch
    cls.after_step = after_step
    def on_epoch_end(epoch):
        if log: Path(log).open('a').write(f'{epoch}\\n')
        if epoch == kill_epoch: armed.append(True)
    spec = TrainSpec(indices=tuple(range(128)), epochs=3, batch_size=32, warmup_epochs=1, width=0.25, objective=name)
    t = train_encoder(spec, load_dataset('digits', size=16), cache_dir=cache, progress_bar=False, on_epoch_end=on_epoch_end)
    state = {f'encoder.{k}': v for k, v in t.encoder.state_dict().items()}
    state |= {f'objective.{k}': v for k, v in t.objective.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, out)
''')


def run(tmp_path, objective, cache, out, **env):
    script = tmp_path / 'train_script.py'; script.write_text(SCRIPT)
    e = dict(os.environ, MEMSSL_PROGRESS='0', MEMSSL_THREADS='1', **env)
    return subprocess.run([sys.executable, str(script), objective, str(cache), str(out)], env=e, capture_output=True, text=True)


def differing(a, b) -> list[str]:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


@pytest.mark.parametrize('objective', sorted(OBJECTIVES))
def test_every_objective_resumes_exactly_after_a_mid_epoch_kill(objective, tmp_path):
    killed = run(tmp_path, objective, tmp_path / 'a', tmp_path / 'a.safetensors', KILL_EPOCH='1')
    assert killed.returncode == -9, killed.stderr[-2000:]
    log = tmp_path / 'resume.log'
    resumed = run(tmp_path, objective, tmp_path / 'a', tmp_path / 'a.safetensors', EPOCH_LOG=str(log))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert log.read_text().split() == ['2', '3']                       # resumed from the epoch-1 checkpoint
    straight = run(tmp_path, objective, tmp_path / 'b', tmp_path / 'b.safetensors')
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert differing(tmp_path / 'a.safetensors', tmp_path / 'b.safetensors') == []


DIGITS = load_dataset('digits', size=16)
SPEC = TrainSpec(indices=tuple(range(96)), epochs=3, batch_size=32, width=0.25)


class Stop(Exception): pass


def interrupted(cache, at: int = 2):
    "Train SPEC into `cache` and stop after epoch `at`, leaving the resume checkpoint; its path."
    def stop(epoch):
        if epoch == at: raise Stop()
    with pytest.raises(Stop): train_encoder(SPEC, DIGITS, cache_dir=cache, progress_bar=False, on_epoch_end=stop)
    (ckpt,) = (Path(cache) / 'encoders').glob('*/checkpoint.safetensors')
    return ckpt


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.encoder.state_dict().values(), b.encoder.state_dict().values()))


@pytest.fixture(scope='module')
def straight():
    return train_encoder(SPEC, DIGITS, cache=False, progress_bar=False)


def rewrite_meta(path: Path, change):
    "The checkpoint at `path` with its metadata replaced by `change(meta)` (a valid hash: only the metadata lies)."
    tensors, meta = read_checkpoint(path)
    path.write_bytes(checkpoint_bytes(tensors, change(meta)))


def flip_tensor_bytes(path: Path, n: int = 16):
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 200, len(raw) - 200 + n): raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_checkpoint_claiming_an_impossible_epoch_is_discarded(tmp_path, straight, capfd):
    ckpt = interrupted(tmp_path)
    rewrite_meta(ckpt, lambda m: {**m, 'epoch': 99, 'history': m['history'] * 50})
    t = train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    err = capfd.readouterr().err
    assert 'epoch 99 of a 3-epoch run' in err and 'from scratch' in err
    assert len(t.history) == 3 and same(t, straight)


def test_flipped_bytes_in_a_resume_checkpoint_restart_training(tmp_path, straight, capfd):
    flip_tensor_bytes(interrupted(tmp_path))
    t = train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    err = capfd.readouterr().err
    assert 'corrupted' in err and 'from scratch' in err
    assert same(t, straight)


def test_flipped_bytes_in_a_cached_encoder_are_an_error(tmp_path):
    t = train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    flip_tensor_bytes(t.path / 'final.safetensors')
    with pytest.raises(CheckpointError, match='corrupted.*delete'):
        train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)


@pytest.mark.parametrize('bad', [None, [1, 2], 'drop history', 'drop optimizer'])
def test_malformed_metadata_is_a_checkpoint_error(bad, tmp_path, straight, capfd):
    ckpt = interrupted(tmp_path)
    def change(m):
        if bad == 'drop history': return {k: v for k, v in m.items() if k != 'history'}
        if bad == 'drop optimizer': return {k: v for k, v in m.items() if k != 'optimizer'}
        return bad
    rewrite_meta(ckpt, change)
    t = train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)    # discarded, retrained, same result
    assert 'from scratch' in capfd.readouterr().err
    assert same(t, straight)
    final = t.path / 'final.safetensors'
    rewrite_meta(final, change if bad != 'drop optimizer' else (lambda m: None))
    with pytest.raises(CheckpointError): train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    (entry,) = cached_encoders(tmp_path)
    assert 'error' in entry and entry['path'] == str(t.path)


def test_a_read_only_cache_serves_what_it_holds(tmp_path, monkeypatch):
    t = train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    def no_lock(path): raise OSError(30, 'Read-only file system', str(path))
    monkeypatch.setattr(train_module, '_file_lock', no_lock)
    again = train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    assert again.from_cache and same(again, t)


def test_an_unwritable_cache_without_the_encoder_says_so(tmp_path):
    (tmp_path / 'encoders').write_text('not a folder')                    # the lock cannot be created under it
    with pytest.raises(CheckpointError, match='not writable'):
        train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)


def test_cache_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try: t = train_encoder(SPEC.replace(epochs=1), DIGITS, cache_dir=tmp_path, progress_bar=False)
    finally: os.umask(old)
    assert (t.path / 'final.safetensors').stat().st_mode & 0o777 == 0o644


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    ckpt = interrupted(tmp_path, at=1)
    torn = ckpt.parent / '.checkpoint.safetensors.999999999.x7.tmp'       # a writer killed mid-write (no such pid)
    torn.write_bytes(b'\0' * 1000)
    train_encoder(SPEC, DIGITS, cache_dir=tmp_path, progress_bar=False)
    assert not torn.exists()


@pytest.mark.parametrize('call, message', [
    (lambda: load_dataset('digits', size=0), 'size must be a positive integer'),
    (lambda: load_dataset('digits', size=-3), 'size must be a positive integer'),
    (lambda: make_split(100, fractions=(float('nan'), 0.5, 0.5)), 'fractions'),
    (lambda: make_split(-5), 'n must be'),
])
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message): call()


def test_view_block_zero_is_named():
    from memssl_nb.sslmem import sslmem
    from memssl_nb.models import build_encoder
    from memssl_nb.augment import Augment
    f = build_encoder('resnet9', 1, 0.25, 16)
    with pytest.raises(ValueError, match='view_block'):
        sslmem(f, f, DIGITS.images[:8], Augment('digits', size=16), n_pairs=1, view_block=0, progress=False)
