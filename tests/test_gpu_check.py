"""The prepared GPU check runs end to end in its dry mode on a CPU (what CI can run); without a GPU the real mode
refuses with a message and exit code 2 instead of a traceback."""
import json, os, subprocess, sys


def run(*args, tmp_path):
    env = dict(os.environ, MEMSSL_PROGRESS='0', MEMSSL_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'memssl_nb.gpu_check', *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_dry_run_writes_the_summary(tmp_path):
    r = run('--dry', '--device', 'cpu', '--out', str(tmp_path/'out'), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path/'out'/'gpu_check.json').read_text())
    assert s['mode'] == 'dry' and s['epoch']['images'] == 160 and s['training_step']['images_per_s'] > 0
    assert s['scoring']['official_over_engine_same_measure'] > 1 and 'skipped' in s['ddp']
    assert '| one epoch of 160 CIFAR-10-format images |' in (tmp_path/'out'/'gpu_check.md').read_text()


def test_real_mode_without_a_gpu_is_a_clear_error(tmp_path):
    r = run('--device', 'cpu', '--out', str(tmp_path/'out'), tmp_path=tmp_path)
    assert r.returncode == 2 and 'run with --dry' in r.stderr and 'Traceback' not in r.stderr
