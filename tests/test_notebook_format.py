"""Every notebook validates against the nbformat schema it declares (4.5: each cell carries a unique `id`), so
JupyterLab, papermill and nbconvert read them without warnings today and without errors once nbformat makes ids
mandatory."""
import json, warnings
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def problems(path: Path) -> list[str]:
    raw = json.loads(path.read_text())
    if (raw['nbformat'], raw['nbformat_minor']) < (4, 5): return ['nbformat older than 4.5 (no cell ids)']
    ids = [c.get('id') for c in raw['cells']]
    out = [f'cell {i} has no id' for i, c in enumerate(ids) if c is None]
    if len({i for i in ids if i}) < len([i for i in ids if i]): out.append('cell ids repeat')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')   # nbformat only warns about what it will refuse later
            nbformat.validate(nbformat.reads(path.read_text(), as_version=nbformat.NO_CONVERT))
    except Exception as e: out.append(f'{type(e).__name__}: {str(e)[:200]}')
    return out


def test_every_notebook_validates_with_cell_ids():
    notebooks = sorted((ROOT / 'nbs').rglob('*.ipynb'))
    assert len(notebooks) > 50
    bad = {str(p.relative_to(ROOT)): e for p in notebooks if (e := problems(p))}
    assert not bad, bad


def test_a_cell_without_id_is_found(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('1')])
    raw = json.loads(nbformat.writes(nb)); del raw['cells'][0]['id']
    (tmp_path / 'x.ipynb').write_text(json.dumps(raw))
    assert problems(tmp_path / 'x.ipynb')[0] == 'cell 0 has no id'


def widget_problems(path: Path) -> list[str]:
    "Widget state or views saved in a notebook: JupyterLab writes them when a notebook with progress bars is saved."
    raw = json.loads(path.read_text())
    out = ['widget state in the notebook metadata'] if 'widgets' in raw.get('metadata', {}) else []
    return out + [f'cell {i}: a widget view in its outputs' for i, c in enumerate(raw['cells'])
                  if any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in c.get('outputs', []))]


def test_no_widget_state_is_committed():
    """Progress bars are widgets in JupyterLab (ipywidgets). Saved, their state is large, changes on every run and
    renders as 'HBox(...)' elsewhere: clear the outputs, or run with MEMSSL_PROGRESS=0, before committing."""
    bad = {str(p.relative_to(ROOT)): e for p in sorted((ROOT / 'nbs').rglob('*.ipynb')) if (e := widget_problems(p))}
    assert not bad, bad


def test_a_saved_widget_is_found(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('1')])
    nb.metadata['widgets'] = {'application/vnd.jupyter.widget-state+json': {'state': {}}}
    nb.cells[0].outputs = [nbformat.v4.new_output('display_data', {'application/vnd.jupyter.widget-view+json': {'model_id': 'a'}})]
    (tmp_path / 'w.ipynb').write_text(nbformat.writes(nb))
    assert widget_problems(tmp_path / 'w.ipynb') == ['widget state in the notebook metadata', 'cell 0: a widget view in its outputs']
