"""Training loop: a real process killed mid-training resumes from its checkpoint and ends with the same
weights as an uninterrupted run; concurrent requests for one encoder train it once."""
import os, subprocess, sys, textwrap
from pathlib import Path
import torch
from safetensors.torch import load_file
from memssl_nb.checkpoint import read_checkpoint

SCRIPT = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from memssl_nb.data import load_dataset
    from memssl_nb.spec import TrainSpec
    from memssl_nb.train import train_encoder
    cache, out = sys.argv[1], sys.argv[2]
    kill_at = int(os.environ.get('KILL_AT', '0'))
    log = os.environ.get('EPOCH_LOG')
    def on_epoch_end(epoch):
        if log: Path(log).open('a').write(f'{epoch}\\n')
        if epoch == kill_at: os.kill(os.getpid(), 9)      # SIGKILL: no cleanup, like a crash
    spec = TrainSpec(indices=tuple(range(192)), epochs=5, batch_size=64, warmup_epochs=1, width=0.25)
    t = train_encoder(spec, load_dataset('digits', size=16), cache_dir=cache, progress_bar=False, on_epoch_end=on_epoch_end)
    save_file({k: v.contiguous() for k, v in t.encoder.state_dict().items()}, out)
''')

def run(tmp_path, cache, out, **env):
    script = tmp_path / 'train_script.py'; script.write_text(SCRIPT)
    e = dict(os.environ, MEMSSL_PROGRESS='0', MEMSSL_THREADS='1', **env)
    return subprocess.run([sys.executable, str(script), str(cache), str(out)], env=e, capture_output=True, text=True)

def same_weights(a, b):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return all(torch.equal(wa[k], wb[k]) for k in wa)

def test_killed_run_resumes_to_identical_weights(tmp_path):
    killed = run(tmp_path, tmp_path / 'cache_a', tmp_path / 'a.safetensors', KILL_AT='3')
    assert killed.returncode == -9, killed.stderr
    ckpts = list((tmp_path / 'cache_a' / 'encoders').glob('*/checkpoint.safetensors'))
    assert len(ckpts) == 1
    saved = read_checkpoint(ckpts[0])[1]['epoch']        # the default budget writes one after epoch 1, then as time allows
    assert 1 <= saved <= 3
    assert not list((tmp_path / 'cache_a' / 'encoders').glob('*/final.safetensors'))
    log = tmp_path / 'resume.log'
    resumed = run(tmp_path, tmp_path / 'cache_a', tmp_path / 'a.safetensors', EPOCH_LOG=str(log))
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text().split() == [str(e) for e in range(saved + 1, 6)]   # only the epochs after the checkpoint ran
    straight = run(tmp_path, tmp_path / 'cache_b', tmp_path / 'b.safetensors')
    assert straight.returncode == 0, straight.stderr
    assert same_weights(tmp_path / 'a.safetensors', tmp_path / 'b.safetensors')

def test_concurrent_requests_train_once(tmp_path):
    logs = [tmp_path / f'p{i}.log' for i in range(2)]
    script = tmp_path / 'train_script.py'; script.write_text(SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / 'cache'), str(tmp_path / f'w{i}.safetensors')],
                              env=dict(os.environ, MEMSSL_PROGRESS='0', MEMSSL_THREADS='1', EPOCH_LOG=str(logs[i])),
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    trained = [l.exists() and l.read_text().split() == ['1', '2', '3', '4', '5'] for l in logs]
    assert sorted(trained) == [False, True]                           # exactly one process trained
    assert same_weights(tmp_path / 'w0.safetensors', tmp_path / 'w1.safetensors')
