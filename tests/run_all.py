#!/usr/bin/env python
"""The project's test command (README and CI): notebooks/library sync check, `nbdev_test` over every
notebook, then pytest over tests/. Ends with one line `N passed, N failed` (notebooks + pytest tests + checks).

Usage: python tests/run_all.py [--skip-sync] [--workers N] [-- extra pytest args]
"""
import os, re, subprocess, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T0 = time.time()


def run(cmd, **kw):
    print('$', ' '.join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, **kw)


def tracked_changes():
    out = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all', '--', 'nbs', 'memssl_nb', 'README.md'],
                         cwd=ROOT, text=True, capture_output=True)
    return out.stdout if out.returncode == 0 else None


def sync_check():
    "nbdev_export and nbdev_clean must not change any file: notebooks are the source of truth."
    before = tracked_changes()
    if before is None:
        print('sync check: not a git checkout, skipped'); return None
    for cmd in (['nbdev_export'], ['nbdev_clean'], [sys.executable, '-m', 'memssl_nb.readme', '--check']):
        exe = [str(BIN / cmd[0])] + cmd[1:] if not cmd[0].startswith('/') and cmd[0] != sys.executable else cmd
        r = run(exe)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:]); return False
    after = tracked_changes()
    if after != before:
        print('FAILED sync check: nbdev_export/nbdev_clean/readme changed files:')
        print(subprocess.run(['git', 'status', '--short', '--', 'nbs', 'memssl_nb', 'README.md'], cwd=ROOT,
                             text=True, capture_output=True).stdout)
        return False
    print('sync check: notebooks, library and README are in sync')
    return True


def notebook_tests(workers):
    env = dict(os.environ, MEMSSL_PROGRESS='0', MEMSSL_THREADS='1', OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    t0 = time.time()
    r = run([str(BIN / 'nbdev_test'), '--n_workers', str(workers), '--do_print', '--timing'], env=env)
    print(r.stdout[-20000:]); print(r.stderr[-20000:], file=sys.stderr)
    # two workers can print onto one line ('...Completed a.ipynbStarting b.ipynb'), so no line anchors
    started = set(re.findall(r'Starting (\S+?\.ipynb)', r.stdout))
    failed_block = r.stderr.split('nbdev Tests Failed On The Following Notebooks:')
    failed = re.findall(r'^\t(\S+\.ipynb)$', failed_block[1], flags=re.M) if len(failed_block) > 1 else []
    if r.returncode != 0 and not failed: failed = ['nbdev_test (crashed)']
    n = max(len(started), len(failed))
    print(f'notebooks: {n - len(failed)} passed, {len(failed)} failed in {time.time() - t0:.0f}s'
          + (f" ({', '.join(failed)})" if failed else ''))
    return n - len(failed), len(failed)


def pytest_tests(extra):
    xml = ROOT / '.pytest_cache' / 'junit.xml'; xml.parent.mkdir(exist_ok=True)
    env = dict(os.environ, MEMSSL_PROGRESS='0', PYTHONWARNINGS='ignore')
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', 'tests', f'--junitxml={xml}', *extra], cwd=ROOT, env=env)
    if r.returncode == 5: return 0, 0   # no tests collected
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
        tests, fail, err, skip = (int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped'))
        return tests - fail - err - skip, fail + err + (1 if r.returncode not in (0, 1) and not (fail + err) else 0)
    except Exception as e:
        print(f'could not read pytest results: {e}'); return 0, 1


def main(argv):
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    opts = argv[:argv.index('--')] if '--' in argv else argv
    workers = int(opts[opts.index('--workers') + 1]) if '--workers' in opts else 2
    passed = failed = 0
    if '--skip-sync' not in opts:
        ok = sync_check()
        if ok is not None: passed, failed = passed + ok, failed + (not ok)
    p, f = notebook_tests(workers); passed += p; failed += f
    p, f = pytest_tests(extra); passed += p; failed += f
    print(f'test run took {time.time() - T0:.0f} s')
    print(f'{passed} passed, {failed} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
