"""The library's floors (`.importlinter`): no module imports from a floor above its own, no import circles, and every
module of the package has its floor in the contract (a new module without one fails here)."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lint_imports_keeps_the_floors():
    r = subprocess.run([str(Path(sys.executable).parent / 'lint-imports')], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert 'Contracts: 2 kept, 0 broken' in r.stdout


def test_every_module_has_a_floor():
    contract = (ROOT / '.importlinter').read_text()
    named = set(re.findall(r'memssl_nb\.(\w+)', contract))
    modules = {p.stem for p in (ROOT / 'memssl_nb').glob('*.py') if not p.stem.startswith('_')}
    assert modules - named == set(), f"modules without a floor in .importlinter: {sorted(modules - named)}"
    assert named - modules == set(), f".importlinter names modules that do not exist: {sorted(named - modules)}"
