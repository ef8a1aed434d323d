"""Two jobs sharing the encoder cache (`memssl reproduce --jobs 2`, `nbdev_test --n_workers 2`) must not corrupt
per-epoch recordings: a job that waited on another job's training lock finds a finished encoder and must still
watch every epoch."""
import shutil, threading, time
from pathlib import Path
import numpy as np
from memssl_nb.data import load_dataset
from memssl_nb.spec import training_data, cache_key
from memssl_nb.train import train_encoder, _file_lock
from memssl_nb.dynamics import lobacheva_regimes, fixed_views, record_hits
from memssl_nb.spec import build_augment


def test_record_hits_after_waiting_for_another_jobs_training(tmp_path):
    small = load_dataset('digits', 'train', size=16).subset(range(64))
    spec = lobacheva_regimes(epochs={'simclr': 2, 'supervised': 2, 'random': 2, 'random+aug': 2},
                             width=0.125, batch_size=32)['supervised'].spec
    views = fixed_views(small.images[:16], build_augment(spec, small), 2)
    reference = record_hits(spec, small, views, small.labels[:16], eval_batch=16, cache=False)
    key = cache_key(spec, training_data(spec, small))
    shared = tmp_path / 'cache'
    result = {}
    with _file_lock(shared / 'encoders' / f'{key}.lock'):          # "another job" is training this key
        worker = threading.Thread(target=lambda: result.update(
            hits=record_hits(spec, small, views, small.labels[:16], eval_batch=16, cache=True, cache_dir=shared)))
        worker.start()
        time.sleep(3)                                               # the worker checks the folder and waits on the lock
        other = tmp_path / 'other'
        train_encoder(spec, small, cache=True, cache_dir=other, progress_bar=False)
        shutil.copytree(other / 'encoders' / key, shared / 'encoders' / key)   # ...and finishes it
    worker.join(timeout=300)
    assert result['hits'].shape == reference.shape == (2, 2, 1, 16)
    np.testing.assert_array_equal(result['hits'], reference)
    # the recording is cached, written atomically
    files = list((shared / 'dynamics').glob('*'))
    assert len(files) == 1 and files[0].suffix == '.npy'
    np.testing.assert_array_equal(np.load(files[0]), reference)
