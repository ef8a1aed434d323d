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
