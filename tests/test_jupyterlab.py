"""JupyterLab comes with the main install: the server starts on a free local port, serves the lab page and hands a paper
notebook out through its contents API, then stops."""
import json, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read().decode()


def test_jupyter_lab_serves_the_notebooks(tmp_path):
    jupyter = Path(sys.executable).parent / 'jupyter'
    assert jupyter.exists() or shutil.which('jupyter'), 'jupyter is not installed in this environment'
    port, token = free_port(), secrets.token_hex(8)
    cmd = [str(jupyter if jupyter.exists() else 'jupyter'), 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT / "nbs"}', '--ServerApp.port_retries=0', '--allow-root']
    env = {'JUPYTER_CONFIG_DIR': str(tmp_path / 'cfg'), 'JUPYTER_RUNTIME_DIR': str(tmp_path / 'rt'),
           'PATH': f"{Path(sys.executable).parent}:/usr/bin:/bin", 'HOME': str(tmp_path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline, status, page = time.time() + 90, None, ''
        while time.time() < deadline:
            if proc.poll() is not None: raise AssertionError(f'jupyter lab exited: {proc.stdout.read().decode()[-3000:]}')
            try: status, page = get(f'{base}/lab?token={token}'); break
            except OSError: time.sleep(0.5)
        assert status == 200 and 'JupyterLab' in page, (status, page[:300])
        status, body = get(f'{base}/api/contents/paper/sslmem_f10.ipynb?token={token}')
        nb = json.loads(body)
        assert status == 200 and nb['type'] == 'notebook'
        cells = nb['content']['cells']
        assert any('parameters' in c['metadata'].get('tags', []) for c in cells)
        status, body = get(f'{base}/api/contents/paper?token={token}')
        assert {'sslmem_f10.ipynb', 'loc_t1.ipynb'} <= {f['name'] for f in json.loads(body)['content']}
    finally:
        proc.terminate()
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        proc.stdout.close()
    assert proc.returncode is not None


def test_progress_bars_are_widgets_in_jupyterlab():
    "tqdm.auto draws a widget bar in a notebook only where ipywidgets is installed (else a warning and a text bar)."
    import tqdm.notebook
    assert tqdm.notebook.IProgress is not None, 'ipywidgets is missing: notebooks would show text bars and a TqdmWarning'
