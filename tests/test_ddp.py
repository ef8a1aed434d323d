"""DistributedDataParallel: `torchrun` starts 2 CPU processes (gloo) that train the same encoders as one process does
with the same global batch; rank 0 alone writes the cache, and a second launch is served from the cache.

Why the match is tight: both ranks draw the epoch's permutation and the augmentation parameters of the whole global
batch from the same (seed, epoch) generators and each uses its shard, SimCLR gathers the projections of both ranks
(differentiable all_gather) and batch norm is synchronised, so the two runs compute the same sums in another order.
What remains is floating-point rounding, and how fast training amplifies it. On random-pixel images with SGD the runs
agree to 1e-5 or better over 12 steps (measured: losses 1e-7, embeddings 4e-5, weights 1e-5; tolerance 1e-4, relative,
or absolute below 1). Two things amplify rounding and are avoided here on purpose: max-pooling over the flat background
of digits has ties that rounding breaks either way (a discrete switch, then divergence after a few steps, just as for
one process run in channels-last format), and Adam's first steps move every coordinate by about ±lr whatever the size
of its gradient, so coordinates whose gradient is rounding noise (a convolution bias cancelled by the batch norm after
it) take steps of random sign. The Adam run is therefore checked on what the network computes after one epoch (loss
1e-4, embeddings 2e-2; measured 3e-7 and 6e-3), not on those weights.

VICReg and DINO (chapter 04) have batch-level terms that each computes over the global batch inside its own forward
(chapter 03a's collectives): VICReg's variance and covariance on the gathered expander outputs, DINO's centre from the
all-reduced teacher mean. Measured over 8 SGD steps: VICReg loss 4e-7, embeddings 4e-5, weights 1e-5; DINO 3e-8, 9e-7,
2e-7, within the same 1e-4 tolerances. With per-rank terms instead (measured before the gathers were added) the runs differ by
VICReg 1e-2, 3e-1, 5e-1 and DINO 2.5e-4, 1.6e-3, 8e-4 (loss, embeddings, weights), so the test fails. DINO runs with
teacher_temp 0.1: at the default 0.04 the sharp teacher amplifies rounding (DDP 4e-6, 2e-3, 7e-4 with the global
centre; one process whose initial weights are perturbed by a relative 1e-7 drifts as far, 7e-4 in the weights after
8 steps), which would need loose tolerances that no longer separate the per-rank centre (3e-3 in the embeddings).
Both sides train in NCHW (`channels_last=False`): the question is DDP, not the layout. In the loop's default
channels-last layout the convolutions of a half batch and of the whole batch take different kernel paths, and SimSiam
amplifies that rounding to 2.4e-4 in the embeddings (measured), beyond the 1e-4 that separates a correct DDP here.
Runs in about 40-50 s on two idle cores.
"""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from memssl_nb.spec import TrainSpec, build_model, training_data
from memssl_nb.checkpoint import read_checkpoint
from memssl_nb.train import train_encoder

DATA = textwrap.dedent('''
    import torch
    from memssl_nb.core import make_generator
    from memssl_nb.data import ImageSet
    def noise_data(n=256):
        "Random-pixel RGB images (no flat regions, so no max-pool ties)."
        g = make_generator(0)
        return ImageSet(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], 'noise')
''')
exec(DATA)

BASE = dict(dataset='noise', epochs=3, batch_size=64, augment='ssl_normal', optimizer='sgd', lr=0.01)   # 4 steps per epoch
SPECS = {
    'simclr_sgd': TrainSpec(**BASE, warmup_epochs=1),                           # gathered NT-Xent + synchronised BN
    'simsiam_sgd': TrainSpec(**BASE, objective='simsiam'),                      # per-rank mean + synchronised BN (1-D too)
    'simclr_adam': TrainSpec(**{**BASE, 'optimizer': 'adam', 'lr': 2e-3, 'epochs': 1}),
    # chapter 04's global-batch terms: VICReg's variance/covariance over the gathered batch, DINO's centre all-reduced
    'vicreg_sgd': TrainSpec(**{**BASE, 'epochs': 2}, objective='vicreg', objective_kw=dict(expander_dim=64)),
    'dino_sgd': TrainSpec(**{**BASE, 'epochs': 2}, objective='dino',   # teacher_temp 0.1: see the docstring
                          objective_kw=dict(n_prototypes=64, hidden_dim=64, teacher_temp=0.1)),
}
CLI_SPEC = TrainSpec(indices=tuple(range(128)), epochs=1, batch_size=64)   # digits, loaded by name

SCRIPT = DATA + textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from memssl_nb.spec import TrainSpec
    from memssl_nb.train import train_encoder
    from memssl_nb.distributed import init_distributed
    rank, world = init_distributed()
    assert world == 2, world
    specs, cache, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
    for name, d in specs.items():
        spec = TrainSpec(**d)
        data = noise_data() if spec.dataset == 'noise' else None           # None: loaded by name (digits)
        t = train_encoder(spec, data, cache_dir=cache / name, progress_bar=False, channels_last=False)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in t.encoder.state_dict().items()}, out / f'{name}.safetensors')
            (out / f'{name}.json').write_text(json.dumps({'loss': t.loss, 'from_cache': t.from_cache}))
    print(json.dumps({'rank': rank, 'done': True}) + '\\n', end='', flush=True)
''')


def torchrun(*args, timeout=180):
    env = dict(os.environ, MEMSSL_PROGRESS='0', MEMSSL_THREADS='1', OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json_objects(r.stdout)


def json_objects(text):
    "Every JSON object printed by the ranks (their lines may share a line of the merged output)."
    dec, out, i = json.JSONDecoder(), [], text.find('{')
    while i >= 0:
        try: obj, end = dec.raw_decode(text, i); out.append(obj); i = text.find('{', end)
        except json.JSONDecodeError: i = text.find('{', i + 1)
    return out


def test_ddp_matches_single_process(tmp_path):
    (tmp_path / 'specs.json').write_text(json.dumps({**{k: s.to_dict() for k, s in SPECS.items()}, 'cli': CLI_SPEC.to_dict()}))
    (tmp_path / 'script.py').write_text(SCRIPT)
    (tmp_path / 'out').mkdir()
    lines = torchrun(tmp_path / 'script.py', tmp_path / 'specs.json', tmp_path / 'cache', tmp_path / 'out')
    assert sorted(l['rank'] for l in lines) == [0, 1]
    data = noise_data()
    threads = torch.get_num_threads(); torch.set_num_threads(1)   # as the ranks: a 2-thread reduction order drifts VICReg by 3e-3
    try: reference = {name: train_encoder(spec, data, cache=False, progress_bar=False, channels_last=False) for name, spec in SPECS.items()}
    finally: torch.set_num_threads(threads)
    for name, spec in SPECS.items():
        one = reference[name]
        ddp = json.loads((tmp_path / 'out' / f'{name}.json').read_text())
        weights = load_file(tmp_path / 'out' / f'{name}.safetensors')
        assert not ddp['from_cache'] and weights.keys() == one.encoder.state_dict().keys()  # plain BN names again
        enc = build_model(spec, training_data(spec, data))[0]
        enc.load_state_dict(weights)
        with torch.no_grad(): e_ddp, e_one = enc.eval()(one.clean(data.images)), one.encoder(one.clean(data.images))
        loss_gap = max(abs(a - b) / max(1, abs(b)) for a, b in zip(ddp['loss'], one.loss))
        emb_gap = ((e_ddp - e_one).norm() / e_one.norm()).item()
        w_gap = max(((weights[k] - v).abs().max() / v.abs().max().clamp(min=1)).item()    # relative, absolute below 1
                    for k, v in one.encoder.state_dict().items() if v.is_floating_point())
        print(f"{name}: relative gaps DDP vs one process: loss {loss_gap:.1e}, embeddings {emb_gap:.1e}, weights {w_gap:.1e}")
        assert len(ddp['loss']) == spec.epochs and loss_gap < 1e-4, (name, loss_gap)
        assert emb_gap < (1e-4 if spec.optimizer == 'sgd' else 2e-2), (name, emb_gap)
        if spec.optimizer == 'sgd': assert w_gap < 1e-4, (name, w_gap)
    # rank 0 alone wrote the cache: one finished encoder per spec, trained by 2 ranks, no checkpoint left behind
    for name in SPECS:
        folder = tmp_path / 'cache' / name / 'encoders'
        finals = list(folder.glob('*/final.safetensors'))
        assert len(finals) == 1 and read_checkpoint(finals[0])[1]['world_size'] == 2
        assert not list(folder.glob('*/checkpoint.*'))
    # a second launch, through the command-line entry point (data loaded by name), is served from the cache on both ranks
    (tmp_path / 'cli.json').write_text(json.dumps(CLI_SPEC.to_dict()))
    lines = torchrun('-m', 'memssl_nb.train', '--spec', tmp_path / 'cli.json', '--cache-dir', tmp_path / 'cache' / 'cli')
    assert sorted((l['rank'], l['from_cache'], l['world_size']) for l in lines) == [(0, True, 2), (1, True, 2)]
