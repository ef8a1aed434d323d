"""The README quotes the committed cpu run: its verdict counts, what would decide the inconclusive claims, how p moved
between the two budgets, and the stability of verdicts between seed sets. Those numbers are hand-written prose in
nbs/index.ipynb; these tests hold them to figures/*/REPORT.md and the committed claims files, so that a rerun that
changes the run cannot leave the README quoting the one before."""
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT/'figures'
README = ' '.join((ROOT/'README.md').read_text().split())     # one line: the prose wraps anywhere
REPORT = (FIG/'cpu'/'REPORT.md').read_text()

def readme_ints(pattern: str) -> list[int]:
    "The integers that `pattern`'s groups capture in the README (a clear failure when the sentence is gone)."
    m = re.search(pattern, README)
    assert m, f"README.md (nbs/index.ipynb) no longer has a sentence matching {pattern!r}; update this test with it"
    return [int(g) for g in m.groups()]

def row(text: str, first: str) -> list[str]:
    "The cells of the first markdown table row of `text` whose first cell is `first`."
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and cells[0] == first: return cells[1:]
    raise AssertionError(f"no table row starting with {first!r}")

def test_verdict_counts():
    claims, holds, contra, inconc, nc = map(int, row(REPORT, '**all**')[5:])
    assert readme_ints(r'In the committed cpu run (\d+) of (\d+) claims hold, (\d+) are contradicted, (\d+) are '
                       r'inconclusive and (\d+) are not checkable') == [holds, claims, contra, inconc, nc]
    per_paper = readme_ints(r'\(SSLMem (\d+) / (\d+) / (\d+), Localizing (\d+) / (\d+) / (\d+), Lobacheva (\d+) / (\d+) / '
                            r'(\d+), Zhang & Cao (\d+) / (\d+) / (\d+)\)')
    report = [int(x) for p in ('sslmem', 'localizing', 'lobacheva', 'zhangcao') for x in row(REPORT, p)[6:9]]
    assert per_paper == report
    elsewhere = [tuple(map(int, m)) for m in re.findall(r'(\d+) of (\d+) hold\b', README)]    # e.g. the scales table
    assert elsewhere and all(m == (holds, claims) for m in elsewhere), elsewhere

def test_what_would_decide_the_inconclusive():
    total, no_test, no_direction, t2, t4, t_far, a2, a_far = map(int, row(REPORT[REPORT.index('## What would decide'):], 'all'))
    assert readme_ints(r'of the (\d+), (\d+) point toward the paper closely enough that up to 4× the data would decide them '
                       r'at the effect measured \((\d+) more point toward it from further away\), (\d+) point against it, '
                       r'(\d+) favour neither direction and (\d+) are point estimates without a test') == \
        [total, t2 + t4, t_far, a2 + a_far, no_direction, no_test]

def test_two_budgets():
    sections = REPORT.split('## The effect at two budgets: `')[1:]
    assert len(sections) == 2, "the README describes two smaller-budget runs"
    kinds = ('no test now', 'no test at the smaller budget', 'toward the paper', 'against the paper', 'mixed', 'no change',
             'not reached by the budget')
    for section in sections:
        label, line = section.split('`', 1)[0], section.split('\n\n')[1]
        n = int(re.search(r'The (\d+) claims that do not hold', line).group(1))
        moved = {k: int(re.search(rf'(\d+) {k}', line).group(1)) if re.search(rf'(\d+) {k}', line) else 0 for k in kinds}
        assert readme_ints(rf'`figures/budget-{re.escape(label)}/cpu/`\), of the (\d+), (\d+) moved toward the paper, (\d+) against it, '
                           r'(\d+) did not move or moved both ways, (\d+) are not reached by that budget .*? and (\d+) have no test '
                           r'at one of the two budgets') == \
            [n, moved['toward the paper'], moved['against the paper'], moved['mixed'] + moved['no change'],
             moved['not reached by the budget'], moved['no test now'] + moved['no test at the smaller budget']]

def identical(report: Path, a: int, b: int) -> tuple[int, int]:
    "(verdicts identical, claims compared) in `report`'s section comparing seed offsets `a` and `b`."
    text = report.read_text()
    section = text[text.index(f'## Stability: seeds shifted by {a} against {b}'):]
    cells = [l for l in section.splitlines() if l.startswith('|')][2].strip('|').split('|')   # header, rule, then the counts
    return int(cells[2].split()[0]), int(cells[1])

def verdicts(folder: Path) -> dict:
    return {(f.name, i, c['statement']): c['verdict'] for f in sorted(folder.glob('*.claims.json'))
            for i, c in enumerate(json.loads(f.read_text())['claims'])}

def test_stability():
    for a, b, report in [(0, 100, FIG/'cpu'/'REPORT.md'), (0, 200, FIG/'cpu'/'REPORT.md'),
                         (100, 200, FIG/'seed-offset-100'/'cpu'/'REPORT.md')]:
        same, n = identical(report, a, b)
        assert readme_ints(rf'\| seeds \+ {a} vs \+ {b} \| (\d+) of (\d+) \(') == [same, n], (a, b)
    runs = [verdicts(FIG/'cpu'), verdicts(FIG/'seed-offset-100'/'cpu'), verdicts(FIG/'seed-offset-200'/'cpu')]
    all_three = sum(runs[0][k] == runs[1].get(k) == runs[2].get(k) for k in runs[0])
    assert readme_ints(r'(\d+) of (\d+) verdicts are the same in all three runs') == [all_three, len(runs[0])]
    holds_in_all = sum(runs[0][k] == runs[1].get(k) == runs[2].get(k) == 'holds' for k in runs[0])
    assert readme_ints(r'(\d+) claims hold in all three runs') == [holds_in_all]
    from memssl_nb.registry import resolve_registry                   # the report's own count agrees
    from memssl_nb.report import seed_set_counts, seed_set_verdicts
    paper_of = {i: a.paper for a in resolve_registry(None, None)[0].values() for i in a.ids}
    counts = seed_set_counts(seed_set_verdicts('cpu', FIG), paper_of).loc['all']
    assert (counts['claims'], counts['same verdict in every seed set'], counts['holds in every seed set']) == \
        (len(runs[0]), all_three, holds_in_all)
    seed_sets = REPORT[REPORT.index('## Verdicts in every seed set'):]       # and so does the committed report's table
    assert tuple(map(int, row(seed_sets, 'all')[:3])) == (len(runs[0]), all_three, holds_in_all)
