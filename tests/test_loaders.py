"""The real torchvision loaders behind `memssl_nb.data.load_dataset`, on tiny files written in each dataset's
exact on-disk format. torchvision md5-checks its files, so each test points the class's file list at the md5
sums of the generated files (monkeypatch); everything else is torchvision's genuine loading code."""
import hashlib, pickle, urllib.error
from pathlib import Path
import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tvd
from memssl_nb.data import DatasetNotFound, ImageSet, load_dataset


def md5(path) -> str: return hashlib.md5(path.read_bytes()).hexdigest()

def images_nchw(n, size, seed):
    "Random uint8 images [n, 3, size, size] with one marked pixel (channel 2, row 3, column 5 of image 1)."
    x = np.random.default_rng(seed).integers(0, 200, (n, 3, size, size), dtype=np.uint8)
    if n > 1: x[1, 2, 3, 5] = 251  # a value the random fill never uses, at an asymmetric position
    return x

def check_roundtrip(ds: ImageSet, x: np.ndarray, labels):
    assert isinstance(ds, ImageSet) and ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert tuple(ds.images.shape) == x.shape
    assert torch.equal(ds.images, torch.from_numpy(x))
    assert ds.images[1, 2, 3, 5].item() == 251 and ds.images[1, 2, 5, 3].item() != 251  # rows are rows
    assert ds.labels.tolist() == list(labels)


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100
def write_cifar(root, hundred: bool, n_per_file=3):
    "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or cifar-100-python/ (train, test, meta)."
    cls = tvd.CIFAR100 if hundred else tvd.CIFAR10
    folder = root/cls.base_folder; folder.mkdir(parents=True)
    k, label_key = (100, 'fine_labels') if hundred else (10, 'labels')
    written = {}
    for i, (fname, _) in enumerate(cls.train_list + cls.test_list):
        n = n_per_file * (5 if hundred and fname == 'train' else 1)
        x = images_nchw(n, 32, seed=i)
        labels = [(i * 7 + j * 3) % k for j in range(n)]
        entry = {'batch_label': fname, 'data': x.reshape(n, 3 * 32 * 32), label_key: labels,
                 'filenames': [f'{fname}_{j}.png' for j in range(n)]}
        if hundred: entry['coarse_labels'] = [l // 5 for l in labels]
        (folder/fname).write_bytes(pickle.dumps(entry, protocol=2))
        written[fname] = (x, labels)
    names = [f'class_{c}' for c in range(k)]
    meta = {'fine_label_names': names, 'coarse_label_names': [f'super_{c}' for c in range(20)]} if hundred else \
           {'label_names': names, 'num_cases_per_batch': n_per_file, 'num_vis': 3072}
    (folder/cls.meta['filename']).write_bytes(pickle.dumps(meta, protocol=2))
    return cls, folder, written, names

def patch_cifar_md5s(monkeypatch, cls, folder):
    monkeypatch.setattr(cls, 'train_list', [[f, md5(folder/f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, 'test_list', [[f, md5(folder/f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, 'meta', {**cls.meta, 'md5': md5(folder/cls.meta['filename'])})

def test_cifar10(tmp_path, monkeypatch):
    cls, folder, written, names = write_cifar(tmp_path, hundred=False)
    patch_cifar_md5s(monkeypatch, cls, folder)
    train = load_dataset('cifar10', 'train', root=tmp_path)
    x = np.concatenate([written[f'data_batch_{i}'][0] for i in range(1, 6)])
    check_roundtrip(train, x, sum((written[f'data_batch_{i}'][1] for i in range(1, 6)), []))
    assert train.classes == names and train.name == 'cifar10-train'
    assert load_dataset('cifar10', 'train', root=tmp_path) is train  # cached
    test = load_dataset('cifar10', 'test', root=tmp_path)
    check_roundtrip(test, *written['test_batch'])
    small = load_dataset('cifar10', 'test', root=tmp_path, size=16)
    assert small.images.shape == (3, 3, 16, 16) and small.images.dtype == torch.uint8
    assert torch.equal(small.labels, test.labels)

def test_cifar100(tmp_path, monkeypatch):
    cls, folder, written, names = write_cifar(tmp_path, hundred=True)
    patch_cifar_md5s(monkeypatch, cls, folder)
    train = load_dataset('cifar100', 'train', root=tmp_path)
    check_roundtrip(train, *written['train'])
    assert len(train.classes) == 100 and train.classes[42] == 'class_42'
    check_roundtrip(load_dataset('cifar100', 'test', root=tmp_path), *written['test'])

def test_cifar_corrupted_file(tmp_path):
    "Files present but not the genuine ones: torchvision's md5 check fails and the error says so."
    write_cifar(tmp_path, hundred=False)
    with pytest.raises(DatasetNotFound, match='corrupted') as e:
        load_dataset('cifar10', root=tmp_path)
    assert 'md5' in str(e.value) and "'digits'" in str(e.value)

def test_download_failure_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs): raise urllib.error.URLError('no network')
    monkeypatch.setattr(tvd.cifar, 'download_and_extract_archive', offline)
    with pytest.raises(DatasetNotFound, match='download failed') as e:
        load_dataset('cifar10', root=tmp_path, download=True)
    msg = str(e.value)
    assert 'cifar-10-python.tar.gz' in msg and 'no network' in msg and "'digits'" in msg


# ---------------------------------------------------------------- SVHN
def test_svhn(tmp_path, monkeypatch):
    split_list = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
    expected = {}
    raw_labels = {'train': [10, 3, 1, 10, 7], 'test': [2, 10, 9, 4, 6, 8]}  # 1..10, where 10 means digit 0
    for i, split in enumerate(('train', 'test')):
        y = np.array(raw_labels[split], dtype=np.uint8)
        x = images_nchw(len(y), 32, seed=10 + i)
        # SVHN's .mat layout: X is [H, W, C, N], y is [N, 1]
        scipy.io.savemat(tmp_path/f'{split}_32x32.mat', {'X': x.transpose(2, 3, 1, 0), 'y': y[:, None]})
        split_list[split][2] = md5(tmp_path/f'{split}_32x32.mat')
        expected[split] = (x, [int(v) % 10 for v in y])
    monkeypatch.setattr(tvd.SVHN, 'split_list', split_list)
    train = load_dataset('svhn', root=tmp_path)
    check_roundtrip(train, *expected['train'])
    assert train.labels.tolist() == [0, 3, 1, 0, 7]  # label 10 became digit 0
    assert train.classes == [str(d) for d in range(10)]
    check_roundtrip(load_dataset('svhn', 'test', root=tmp_path), *expected['test'])
    assert load_dataset('svhn', 'test', root=tmp_path, size=8).images.shape == (6, 3, 8, 8)


# ---------------------------------------------------------------- STL-10
STL_NAMES = ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck']

def test_stl10(tmp_path, monkeypatch):
    folder = tmp_path/'stl10_binary'; folder.mkdir()
    x_train, x_test, x_unl = images_nchw(3, 96, 20), images_nchw(2, 96, 21), images_nchw(2, 96, 22)
    y_train, y_test = [3, 0, 9], [7, 1]
    # stored per image as [C, W, H] (column-major images); labels 1..10
    for name, x in (('train_X.bin', x_train), ('test_X.bin', x_test), ('unlabeled_X.bin', x_unl)):
        (folder/name).write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
    for name, y in (('train_y.bin', y_train), ('test_y.bin', y_test)):
        (folder/name).write_bytes(np.array(y, dtype=np.uint8).__add__(1).tobytes())
    (folder/'class_names.txt').write_text('\n'.join(STL_NAMES) + '\n')
    monkeypatch.setattr(tvd.STL10, 'train_list', [[f, md5(folder/f)] for f, _ in tvd.STL10.train_list])
    monkeypatch.setattr(tvd.STL10, 'test_list', [[f, md5(folder/f)] for f, _ in tvd.STL10.test_list])

    train = load_dataset('stl10', root=tmp_path)
    check_roundtrip(train, x_train, y_train)
    assert train.classes == STL_NAMES and train.image_size == (96, 96)
    check_roundtrip(load_dataset('stl10', 'test', root=tmp_path), x_test, y_test)
    unl = load_dataset('stl10', 'unlabeled', root=tmp_path)
    check_roundtrip(unl, x_unl, [-1, -1])
    both = load_dataset('stl10', 'train+unlabeled', root=tmp_path)
    assert both.labels.tolist() == y_train + [-1, -1]
    # size= resizes with antialiasing: a constant image stays constant, a 96 px image becomes 32 px
    small = load_dataset('stl10', root=tmp_path, size=32)
    assert small.images.shape == (3, 3, 32, 32) and torch.equal(small.labels, train.labels)
    assert abs(small.images.float().mean() - train.images.float().mean()) < 1.0


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize('name,folder,file', [
    ('cifar10', 'cifar-10-batches-py', 'data_batch_1'), ('cifar100', 'cifar-100-python', 'meta'),
    ('svhn', '', 'train_32x32.mat'), ('stl10', 'stl10_binary', 'train_X.bin')])
def test_missing_files_message(tmp_path, name, folder, file):
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(name, root=tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert str((tmp_path/folder).resolve()) in msg and file in msg
    assert 'download=True' in msg and "load_dataset('digits')" in msg

def test_unknown_name_and_split():
    with pytest.raises(ValueError, match='available: digits, photos, fashion_mnist, cifar10, cifar100, svhn, stl10'):
        load_dataset('imagenet')
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_dataset('svhn', 'valid')


# ---------------------------------------------------------------- Fashion-MNIST (torchvision's FashionMNIST class)
def write_idx(path, arr):
    "An idx file as Fashion-MNIST ships it, gzip-compressed: magic 0x0008 + ndim, big-endian dimensions, uint8 data."
    import gzip
    header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in arr.shape)
    path.write_bytes(gzip.compress(header + np.asarray(arr, dtype=np.uint8).tobytes()))


def write_fashion(folder, n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for part, split in (('train', 'train'), ('t10k', 'test')):
        imgs, labs = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(folder / f'{part}-images-idx3-ubyte.gz', imgs); write_idx(folder / f'{part}-labels-idx1-ubyte.gz', labs)
        out[split] = (imgs, labs)
    return out


def test_fashion_mnist_from_a_package_folder(tmp_path, monkeypatch):
    (tmp_path / 'pkg').mkdir()
    written = write_fashion(tmp_path / 'pkg')
    monkeypatch.setenv('MEMSSL_FASHION_MNIST', str(tmp_path / 'pkg'))
    for split in ('train', 'test'):
        ds = load_dataset('fashion_mnist', split, root=tmp_path / 'data')
        assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8 and ds.name == f'fashion_mnist-{split}'
        assert np.array_equal(ds.images[:, 0].numpy(), written[split][0]) and ds.labels.tolist() == written[split][1].tolist()
        assert ds.classes[:2] == ['T-shirt/top', 'Trouser']
    assert load_dataset('fashion_mnist', 'test', root=tmp_path / 'data', size=16).images.shape == (5, 1, 16, 16)


def test_fashion_mnist_from_gz_files_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('MEMSSL_FASHION_MNIST', str(tmp_path / 'no-package'))
    raw = tmp_path / 'FashionMNIST' / 'raw'; raw.mkdir(parents=True)
    written = write_fashion(raw, n=3, seed=1)
    ds = load_dataset('fashion_mnist', 'train', root=tmp_path)
    assert np.array_equal(ds.images[:, 0].numpy(), written['train'][0])


def test_fashion_mnist_missing_names_every_way_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv('MEMSSL_FASHION_MNIST', str(tmp_path / 'no-package'))
    with pytest.raises(DatasetNotFound) as e:
        load_dataset('fashion_mnist', root=tmp_path)
    msg = str(e.value)
    assert 'download=True' in msg and 'apt-get install dataset-fashion-mnist' in msg and str((tmp_path / 'FashionMNIST' / 'raw').resolve()) in msg
    assert 'train-images-idx3-ubyte' in msg


@pytest.mark.skipif(not Path('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz').exists(),
                    reason='the Debian package dataset-fashion-mnist is not installed')
def test_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.delenv('MEMSSL_FASHION_MNIST', raising=False)
    train, test = load_dataset('fashion_mnist', root=tmp_path), load_dataset('fashion_mnist', 'test', root=tmp_path)
    assert (len(train), len(test)) == (60000, 10000) and train.labels.bincount().tolist() == [6000] * 10
