"""Batched metric engine (sslmem, layermem, unitmem) vs naive per-point references, and "measuring never changes the model".

The references below loop over points and views one at a time (batch size 1), read layers with their own forward
hooks, and compute every formula with NumPy in float64. The only thing they share with the engine is the documented
view stream: block j of `view_block` points gets a generator seeded from (seed, j), and one call
`augment(x_block.repeat(n_views, 1, 1, 1), generator)` draws its views (row r*b + i = view r of point i).
"""
import statistics
import numpy as np
import pytest
import torch
import torch.nn as nn

from memssl_nb.core import make_generator, to_float01
from memssl_nb.sslmem import block_generator, sslmem, compare_sets, set_summary, SSLMemResult
from memssl_nb.layermem import layermem
from memssl_nb.unitmem import unitmem, unit_activations, classmem, class_selectivity
from memssl_nb.testing import toy_augment as augment, toy_images, ToyRes

TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- stand-ins
def Res(seed, w=6, c_in=1):
    "Small residual CNN with BatchNorm (non-trivial running stats), paper-style taps and parents, and a dead unit."
    return ToyRes(seed, w, c_in, bn_stats=True, dead_unit=True)


def images(n=7, size=8, seed=0, c=1): return toy_images(n, size, seed, channels=c)


# ---------------------------------------------------------------- naive references
def reference_views(imgs, n_views, seed, view_block):
    "views[i][r] = view r of point i, as [1, C, H, W] tensors, per the documented stream."
    out = []
    for j, start in enumerate(range(0, len(imgs), view_block)):
        x = to_float01(imgs[start:start + view_block])
        b = len(x)
        v = augment(x.repeat(n_views, 1, 1, 1), block_generator(seed, j))
        for i in range(b): out.append([v[r * b + i:r * b + i + 1] for r in range(n_views)])
    return out


def forward_taps(model, x, names):
    "One forward of a single image; taps read by plain hooks written here; numpy float64."
    store, mods = {}, dict(model.named_modules())
    paths = {n: getattr(model, 'taps', {}).get(n, n) for n in names}
    hs = [mods[p].register_forward_hook(lambda m, a, o, n=n: store.__setitem__(n, o.detach().clone())) for n, p in paths.items()]
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(): model(x)
    finally:
        for h in hs: h.remove()
        for m, t in was: m.training = t
    return {n: store[n].double().numpy()[0] for n in names}


def rep_vec(t, representation='flatten', normalize=True):
    if representation == 'pool':
        t = t.mean(axis=(1, 2)) if t.ndim == 3 else (t.mean(axis=0) if t.ndim == 2 else t)
    v = t.reshape(-1)
    if normalize:
        n = np.sqrt((v ** 2).sum())
        v = v / max(n, 1e-12)
    return v


def dist(a, b, kind='l2'):
    if kind == 'l2': return float(np.sqrt(((a - b) ** 2).sum()))
    if kind == 'l1': return float(np.abs(a - b).sum())
    cos = float((a * b).sum() / max(np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()), 1e-12))
    if kind == 'cosine': return 1 - cos
    return float(np.arccos(min(1.0, max(-1.0, cos))) / np.pi)


def reference_alignment(model, imgs, names, n_pairs, views='two_augmented', representation='flatten',
                        normalize=True, distance='l2', seed=0, view_block=32):
    "[N, L] mean distance over K pairs, one point, one view, one forward at a time."
    n_views = 2 * n_pairs if views == 'two_augmented' else n_pairs
    allv = reference_views(imgs, n_views, seed, view_block)
    out = np.zeros((len(imgs), len(names)))
    for i in range(len(imgs)):
        clean = forward_taps(model, to_float01(imgs[i:i + 1]), names) if views != 'two_augmented' else None
        for j, name in enumerate(names):
            ds = []
            for k in range(n_pairs):
                if views == 'two_augmented':
                    a = forward_taps(model, allv[i][k], names)[name]
                    b = forward_taps(model, allv[i][n_pairs + k], names)[name]
                else:
                    a, b = clean[name], forward_taps(model, allv[i][k], names)[name]
                ds.append(dist(rep_vec(a, representation, normalize), rep_vec(b, representation, normalize), distance))
            out[i, j] = sum(ds) / len(ds)
    return out


def reference_score(df, dg, normalization='relative'):
    d = dg - df
    if normalization == 'none': return d
    if normalization == 'relative':
        return np.array([[(dg[i, j] - df[i, j]) / (dg[i, j] + df[i, j]) if dg[i, j] + df[i, j] > 0 else 0.0
                          for j in range(d.shape[1])] for i in range(d.shape[0])])
    if normalization == 'range':
        return np.stack([d[:, j] / (d[:, j].max() - d[:, j].min()) for j in range(d.shape[1])], 1)
    return np.stack([d[:, j] / np.abs(d[:, j]).max() for j in range(d.shape[1])], 1)


def reference_unit_means(model, imgs, name, n_views, seed=0, view_block=32):
    "µ_u(x) with explicit loops over points, views and units (spatial / token mean per unit)."
    allv = reference_views(imgs, n_views, seed, view_block) if n_views else [[to_float01(imgs[i:i + 1])] for i in range(len(imgs))]
    rows = []
    for i in range(len(imgs)):
        acc = None
        for v in allv[i]:
            t = forward_taps(model, v, [name])[name]
            if t.ndim == 3: units = [t[u].mean() for u in range(t.shape[0])]                # conv: [C, H, W]
            elif t.ndim == 2: units = [t[:, u].mean() for u in range(t.shape[1])]           # tokens: [T, D]
            else: units = list(t)
            acc = units if acc is None else [a + u for a, u in zip(acc, units)]
        rows.append([a / len(allv[i]) for a in acc])
    return np.array(rows)


def reference_selectivity(mu, rest='mean'):
    "Per unit: max over rows, the rest (mean or median of the others), the ratio (0/0 -> 0), argmax."
    scores, owners = [], []
    for u in range(mu.shape[1]):
        col = [float(v) for v in mu[:, u]]
        k = max(range(len(col)), key=lambda i: (col[i], -i))        # first maximum
        others = col[:k] + col[k + 1:]
        r = sum(others) / len(others) if rest == 'mean' else statistics.median(others)
        scores.append((col[k] - r) / (col[k] + r) if col[k] + r != 0 else 0.0)
        owners.append(k)
    return np.array(scores), np.array(owners)


# ---------------------------------------------------------------- SSLMem
@pytest.mark.parametrize('normalization', ['relative', 'none', 'range', 'maxabs'])
def test_sslmem_matches_reference(normalization):
    f, g, imgs = Res(0), Res(1), images(7)
    r = sslmem(f, g, imgs, augment, n_pairs=3, normalization=normalization, batch_size=5, view_block=3, progress=False)
    df = reference_alignment(f, imgs, ['embedding'], 3, view_block=3)
    dg = reference_alignment(g, imgs, ['embedding'], 3, view_block=3)
    np.testing.assert_allclose(r.dist_f.numpy(), df[:, 0], **TOL)
    np.testing.assert_allclose(r.dist_g.numpy(), dg[:, 0], **TOL)
    np.testing.assert_allclose(r.score.numpy(), reference_score(df, dg, normalization)[:, 0], **TOL)


@pytest.mark.parametrize('distance,normalize,views', [('l1', True, 'two_augmented'), ('cosine', False, 'two_augmented'),
                                                      ('angular', True, 'two_augmented'), ('l2', False, 'two_augmented'),
                                                      ('l2', True, 'clean_vs_augmented')])
def test_sslmem_options_match_reference(distance, normalize, views):
    f, g, imgs = Res(0), Res(1), images(5, seed=3)
    r = sslmem(f, g, imgs, augment, n_pairs=2, distance=distance, normalize_reps=normalize, views=views, seed=7,
               progress=False)
    kw = dict(views=views, normalize=normalize, distance=distance, seed=7)
    df, dg = reference_alignment(f, imgs, ['embedding'], 2, **kw), reference_alignment(g, imgs, ['embedding'], 2, **kw)
    np.testing.assert_allclose(r.dist_f.numpy(), df[:, 0], **TOL)
    np.testing.assert_allclose(r.score.numpy(), reference_score(df, dg)[:, 0], **TOL)


def test_sslmem_several_seeds_average_distances_before_the_difference():
    fs, gs, imgs = [Res(0), Res(2)], [Res(1), Res(3), Res(4)], images(5)
    r = sslmem(fs, gs, imgs, augment, n_pairs=2, progress=False)
    df = np.mean([reference_alignment(e, imgs, ['embedding'], 2)[:, 0] for e in fs], 0)
    dg = np.mean([reference_alignment(e, imgs, ['embedding'], 2)[:, 0] for e in gs], 0)
    np.testing.assert_allclose(r.dist_f.numpy(), df, **TOL)
    np.testing.assert_allclose(r.score.numpy(), (dg - df) / (dg + df), **TOL)
    assert r.dist_f_all.shape == (2, 5) and r.dist_g_all.shape == (3, 5)


def test_batch_size_and_input_type_do_not_change_the_numbers():
    f, g, imgs = Res(0), Res(1), images(9)
    scores = [sslmem(f, g, x, augment, n_pairs=2, batch_size=bs, progress=False).score
              for bs, x in [(1, imgs), (3, imgs), (1000, imgs.float() / 255)]]
    for s in scores[1:]: torch.testing.assert_close(s, scores[0], rtol=1e-5, atol=1e-6)


class Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__(); self.inner, self.seen = inner, []
    def forward(self, x):
        self.seen.append(x.clone()); return self.inner(x)


def test_f_and_g_see_the_same_views():
    f, g = Recorder(Res(0)), Recorder(Res(1))
    sslmem(f, g, images(6), augment, n_pairs=2, batch_size=4, progress=False)
    assert len(f.seen) == len(g.seen) > 1
    for a, b in zip(f.seen, g.seen): assert torch.equal(a, b)


def test_sslmem_self_comparison_is_zero_and_errors_are_clear():
    f, imgs = Res(0), images(4)
    assert torch.equal(sslmem(f, f, imgs, augment, n_pairs=2, progress=False).score, torch.zeros(4))
    bad = [(dict(g=Res(1, w=4)), 'same shape'), (dict(images=imgs.float()), '[0, 1]'),
           (dict(images=imgs.long()), 'uint8 or floating'), (dict(images=imgs[:0]), 'empty point set'),
           (dict(n_pairs=0), 'n_pairs')]
    for kw, msg in bad:
        args = dict(f=f, g=Res(1), images=imgs, augment=augment, n_pairs=2, progress=False, **{})
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=None) as e: sslmem(**args)
        assert msg in str(e.value), (msg, str(e.value))


# ---------------------------------------------------------------- LayerMem
def test_layermem_matches_reference_per_layer():
    f, g, imgs = Res(0), Res(1), images(6, seed=5)
    names = list(f.taps)
    r = layermem(f, g, imgs, augment, n_pairs=2, batch_size=3, view_block=4, progress=False)
    df = reference_alignment(f, imgs, names, 2, view_block=4)
    dg = reference_alignment(g, imgs, names, 2, view_block=4)
    assert r.layers == names
    np.testing.assert_allclose(r.dist_f.numpy(), df, **TOL)
    np.testing.assert_allclose(r.dist_g.numpy(), dg, **TOL)
    ref = reference_score(df, dg)
    np.testing.assert_allclose(r.score.numpy(), ref, **TOL)
    # the table: LayerMem = mean over points; ΔLayerMem vs the parent; top-k / least-k by the last layer
    t = r.table(top_k=2)
    lm = {n: ref[:, j].mean() for j, n in enumerate(names)}
    all_rows = t[t.subset == 'all'].set_index('layer')
    for n in names:
        assert abs(all_rows.layermem[n] - lm[n]) < 1e-5
        p = f.tap_parents[n]
        if p is None: assert np.isnan(all_rows.delta_layermem[n])
        else: assert abs(all_rows.delta_layermem[n] - (lm[n] - lm[p])) < 1e-5
        assert abs(all_rows.frac_negative[n] - (ref[:, names.index(n)] < 0).mean()) < 1e-9
    order = sorted(range(6), key=lambda i: -ref[i, -1])
    top = t[t.subset == 'top2'].set_index('layer'); least = t[t.subset == 'least2'].set_index('layer')
    for j, n in enumerate(names):
        assert abs(top.layermem[n] - ref[order[:2], j].mean()) < 1e-5
        assert abs(least.layermem[n] - ref[order[-2:], j].mean()) < 1e-5


@pytest.mark.parametrize('representation,distance', [('pool', 'l2'), ('flatten', 'angular')])
def test_layermem_options_match_reference(representation, distance):
    f, g, imgs = Res(0), Res(1), images(4, seed=6)
    r = layermem(f, g, imgs, augment, layers=['conv2', 'conv3'], n_pairs=2, representation=representation,
                 distance=distance, normalization='range', progress=False)
    assert r.layers == ['conv1', 'conv2', 'pool', 'conv3']          # parents come along
    kw = dict(representation=representation, distance=distance)
    df, dg = reference_alignment(f, imgs, r.layers, 2, **kw), reference_alignment(g, imgs, r.layers, 2, **kw)
    np.testing.assert_allclose(r.score.numpy(), reference_score(df, dg, 'range'), **TOL)


def test_sslmem_is_the_last_layer_of_layermem():
    f, g, imgs = Res(0), Res(1), images(5)
    s = sslmem(f, g, imgs, augment, n_pairs=2, progress=False)
    l = layermem(f, g, imgs, augment, n_pairs=2, progress=False).layer('embedding')
    torch.testing.assert_close(l.score, s.score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l.dist_g, s.dist_g, rtol=1e-5, atol=1e-6)


def test_layermem_module_paths_for_any_model():
    mk = lambda s: (torch.manual_seed(s), nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten()))[1]
    f, g, imgs = mk(0), mk(1), images(4)
    r = layermem(f, g, imgs, augment, layers=['1', '2'], n_pairs=2, progress=False)
    assert r.parents == {'1': None, '2': '1'}
    df, dg = reference_alignment(f, imgs, ['1', '2'], 2), reference_alignment(g, imgs, ['1', '2'], 2)
    np.testing.assert_allclose(r.score.numpy(), reference_score(df, dg), **TOL)
    with pytest.raises(ValueError, match='module paths'): layermem(f, g, imgs, augment, layers=['9'], progress=False)


# ---------------------------------------------------------------- UnitMem / ClassMem
@pytest.mark.parametrize('rest', ['mean', 'median'])
def test_unitmem_matches_reference(rest):
    enc, imgs = Res(0), images(7, seed=8)
    r = unitmem(enc, imgs, augment, layers=['conv1', 'conv3', 'embedding'], n_views=3, rest=rest, batch_size=4,
                view_block=3, progress=False)
    for name in ['conv1', 'conv3', 'embedding']:
        mu = reference_unit_means(enc, imgs, name, 3, view_block=3)
        np.testing.assert_allclose(r.activations[name].numpy(), mu, **TOL)
        score, owner = reference_selectivity(mu, rest)
        np.testing.assert_allclose(r.score[name].numpy(), score, **TOL)
        np.testing.assert_array_equal(r.owner[name].numpy(), owner)
    assert r.score['conv1'][0] == 0 and not torch.isnan(torch.cat(list(r.score.values()))).any()   # dead unit -> 0


def test_unitmem_even_count_median_and_vit_token_mean():
    from memssl_nb.models import build_encoder
    torch.manual_seed(0)
    vit = build_encoder('vit_micro', in_channels=1, image_size=16)
    imgs = images(5, size=16, seed=9)                                      # 4 "other" points: even-count median
    r = unitmem(vit, imgs, augment, layers=['block1.fc', 'embedding'], n_views=2, rest='median', progress=False)
    for name in ['block1.fc', 'embedding']:
        mu = reference_unit_means(vit, imgs, name, 2)
        np.testing.assert_allclose(r.activations[name].numpy(), mu, **TOL)
        np.testing.assert_allclose(r.score[name].numpy(), reference_selectivity(mu, 'median')[0], rtol=1e-3, atol=1e-4)


def test_classmem_and_class_selectivity_match_reference():
    enc, imgs = Res(0), images(9, seed=10)
    labels = torch.tensor([3, 1, 3, 1, 7, 7, 3, 1, 7])
    for fn in (classmem, class_selectivity):
        r = fn(enc, imgs, labels, layers=['conv2', 'embedding'], progress=False)
        for name in ['conv2', 'embedding']:
            mu = reference_unit_means(enc, imgs, name, 0)                   # no augmentation by default
            classes = sorted(set(labels.tolist()))
            means = np.array([[np.mean([mu[i, u] for i in range(9) if labels[i] == c]) for u in range(mu.shape[1])]
                              for c in classes])
            score, arg = reference_selectivity(means, 'mean')
            np.testing.assert_allclose(r.class_means[name].numpy(), means, **TOL)
            np.testing.assert_allclose(r.score[name].numpy(), score, **TOL)
            np.testing.assert_array_equal(r.preferred_class[name].numpy(), np.array(classes)[arg])


def test_classmem_with_augmentation_matches_reference():
    enc, imgs = Res(0), images(6, seed=11)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    r = classmem(enc, imgs, labels, layers=['conv3'], augment=augment, n_views=2, progress=False)
    mu = reference_unit_means(enc, imgs, 'conv3', 2)
    means = np.stack([mu[labels.numpy() == c].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(r.score['conv3'].numpy(), reference_selectivity(means)[0], **TOL)


# ---------------------------------------------------------------- set statistics
def test_set_statistics_match_scipy():
    from scipy import stats
    rng = np.random.default_rng(0)
    sets = {'S_C': rng.normal(.1, .1, 40), 'S_S': rng.normal(0, .1, 50), 'S_I': rng.normal(-.1, .1, 30),
            'S_E': rng.normal(0, .1, 45)}
    t = compare_sets(sets)
    assert len(t) == 8
    for (a, b, alt) in [('S_C', 'S_S', 'greater'), ('S_C', 'S_E', 'greater'), ('S_I', 'S_S', 'less'), ('S_I', 'S_E', 'less')]:
        rows = t[(t.set_a == a) & (t.set_b == b)].set_index('test')
        assert rows.alternative.iloc[0] == alt
        w = stats.ttest_ind(sets[a], sets[b], equal_var=False, alternative=alt)
        u = stats.mannwhitneyu(sets[a], sets[b], alternative=alt)
        assert np.isclose(rows.p_value['welch_t'], w.pvalue) and np.isclose(rows.statistic['welch_t'], w.statistic)
        assert np.isclose(rows.p_value['mann_whitney_u'], u.pvalue)
    s = set_summary(sets).set_index('set')
    assert np.isclose(s.loc['S_C', 'median'], np.median(sets['S_C'])) and s.loc['S_I', 'n'] == 30
    student = compare_sets(sets, equal_var=True)
    assert np.isclose(student.p_value[0], stats.ttest_ind(sets['S_C'], sets['S_S'], alternative='greater').pvalue)


# ---------------------------------------------------------------- measuring never changes the model
def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mixed_modes(model):
    "Put the model in train mode, except a couple of submodules in eval: a pattern that must survive measuring."
    model.train()
    mods = list(model.modules())
    for m in mods[2::3]: m.eval()
    return [m.training for m in mods]


def assert_unchanged(model, state, modes):
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k in state: assert torch.equal(state[k], after[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


CALLS = {
    'sslmem': lambda f, g, x: sslmem(f, g, x, augment, n_pairs=2, progress=False),
    'sslmem_clean': lambda f, g, x: sslmem(f, g, x, augment, n_pairs=2, views='clean_vs_augmented', progress=False),
    'layermem': lambda f, g, x: layermem(f, g, x, augment, n_pairs=2, progress=False),
    'unitmem': lambda f, g, x: unitmem(f, x, augment, n_views=2, progress=False),
    'classmem': lambda f, g, x: classmem(f, x, torch.arange(len(x)) % 2, progress=False),
}


@pytest.mark.parametrize('name', list(CALLS))
def test_measuring_never_changes_the_model(name):
    f, g, imgs = Res(0), Res(1), images(5)
    sf, sg, mf, mg = snapshot(f), snapshot(g), mixed_modes(f), mixed_modes(g)
    CALLS[name](f, g, imgs)
    assert_unchanged(f, sf, mf); assert_unchanged(g, sg, mg)


class Flaky(nn.Module):
    "Wraps an encoder (keeping its taps); every forward after the first raises."
    def __init__(self, inner):
        super().__init__(); self.inner, self.calls = inner, 0
        self.taps = {k: f'inner.{v}' for k, v in inner.taps.items()}
        self.tap_parents = dict(inner.tap_parents)
    def forward(self, x):
        self.calls += 1
        if self.calls >= 2: raise RuntimeError('forward failed')
        return self.inner(x)


@pytest.mark.parametrize('name,failure', [(n, w) for n in CALLS for w in ('augment', 'forward') if (n, w) != ('classmem', 'augment')])
def test_modes_and_hooks_restored_after_an_exception(name, failure, monkeypatch):
    f, g, imgs = Res(0), Res(1), torch.cat([images(5)] * 10)     # several view blocks
    if failure == 'forward': f = Flaky(f)
    else:
        real, calls = augment, {'n': 0}
        def failing(x, generator=None):
            calls['n'] += 1
            if calls['n'] >= 2: raise RuntimeError('augment failed')
            return real(x, generator)
        monkeypatch.setitem(globals(), 'augment', failing)
    sf, sg, mf, mg = snapshot(f), snapshot(g), mixed_modes(f), mixed_modes(g)
    with pytest.raises(RuntimeError, match=f'{failure} failed'): CALLS[name](f, g, imgs)
    assert_unchanged(f, sf, mf); assert_unchanged(g, sg, mg)


def test_layermem_on_a_model_that_overwrites_a_tap_in_place():
    "ReLU(inplace=True) overwrites the conv output after the hook ran: the reader falls back to copies."
    mk = lambda s: (torch.manual_seed(s), nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten()))[1]
    f, g, imgs = mk(0), mk(1), images(4)
    r = layermem(f, g, imgs, augment, layers=['0', '2'], n_pairs=2, progress=False)
    df, dg = reference_alignment(f, imgs, ['0', '2'], 2), reference_alignment(g, imgs, ['0', '2'], 2)
    np.testing.assert_allclose(r.score.numpy(), reference_score(df, dg), **TOL)
    assert not np.allclose(r.score[:, 0].numpy(), r.score[:, 1].numpy())   # pre- and post-ReLU really differ
