"""Every result class prints as a short summary (never its tensors) and shows a table in a notebook."""
import torch

from memssl_nb.core import Summarized
from memssl_nb.data import load_dataset
from memssl_nb.models import build_encoder
from memssl_nb.augment import Augment
from memssl_nb.sslmem import sslmem
from memssl_nb.layermem import layermem
from memssl_nb.unitmem import unitmem, classmem
from memssl_nb.supmem import supmem_from_predictions
from memssl_nb.protocol import protocol_config, run_protocol

torch.set_num_threads(1)


def check(result, *words):
    text, page = repr(result), result._repr_html_()
    assert isinstance(result, Summarized)
    assert len(text) < 400 and '\n' not in text and 'tensor(' not in text, text
    assert text.startswith(type(result).__name__ + '(')
    assert '<table' in page and 'tensor(' not in page
    for w in words: assert w in text, (w, text)


def test_metric_results_print_short():
    data = load_dataset('digits', size=16)
    x, y = data.images[:40], data.labels[:40]
    torch.manual_seed(0)
    f, g = build_encoder('resnet9', 1, 0.25, 16).eval(), build_encoder('resnet9', 1, 0.25, 16).eval()
    aug = Augment('digits', size=16)
    check(sslmem(f, g, x, aug, n_pairs=2, progress=False), '40 points', 'relative normalization')
    check(layermem(f, g, x, aug, ['conv1', 'conv4_2'], n_pairs=2, progress=False), '40 points × 3 layers', 'conv4_2')
    check(unitmem(f, x, aug, ['conv1', 'conv4_2'], n_views=2, progress=False), '40 points, 2 layers, 72 units')
    check(classmem(f, x, y, ['conv1']), '10 classes, 1 layers, 8 units')
    masks = torch.rand(6, 40, generator=torch.Generator().manual_seed(0)) < 0.5
    check(supmem_from_predictions(masks.float(), masks), '40 points')


def test_training_results_print_short():
    run = run_protocol(protocol_config('smoke'), progress_bar=False)
    check(run, 'digits 16 px', '1 f/g pairs')
    check(run.f[0], 'simclr resnet9', '2 epochs')
    assert 'Parameter containing' not in repr(run.f[0])
