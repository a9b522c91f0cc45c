"""The original ``low_shot.py`` (facebookresearch/low-shot-shrink-hallucinate), ported to current PyTorch / h5py
line for line and otherwise unchanged, as ``bench perf --sections lowshot`` runs it: one process per
(experiment, n), the train HDF5 file reopened and its labels rescanned, one fancy-indexed HDF5 read of the sampled
base rows per iteration (``np.random.choice(..., replace=False)`` over all base rows), nn.Linear +
torch.optim.SGD (momentum = dampening), the test file read through a DataLoader. Seeded (the original is not) so
that runs repeat; ``np.in1d`` became ``np.isin`` (removed from numpy 2.4); the script's top level became
:func:`main`.

Run as ``python lowshot_original.py LOWSHOTMETA EXPERIMENTPATH EXPERIMENTID LOWSHOTN TRAINFILE TESTFILE TESTSETUP
NUMCLASSES LR MOMENTUM WD MAXITERS BATCHSIZE OUTPATH SEED THREADS``; it writes the six accuracies to OUTPATH.
It imports nothing of this repository.
"""

import json
import sys

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.optim
import torch.utils.data

lr = momentum = wd = None   # set by main(), read by training_loop as in the original

class SimpleHDF5Dataset:
    def __init__(self, file_handle):
        self.f = file_handle
        self.all_feats_dset = self.f['all_feats'][...]
        self.all_labels = self.f['all_labels'][...]
        self.total = self.f['count'][0]
    def __getitem__(self, i):
        return torch.Tensor(self.all_feats_dset[i, :]), int(self.all_labels[i])
    def __len__(self):
        return self.total

class LowShotDataset:
    def __init__(self, file_handle, base_classes, novel_classes, novel_idx):
        self.f = file_handle
        self.all_feats_dset = self.f['all_feats']
        self.all_labels = self.f['all_labels'][...]
        self.base_class_ids = np.where(np.isin(self.all_labels, base_classes))[0]
        total = self.f['count'][0]
        self.base_class_ids = self.base_class_ids[self.base_class_ids < total]
        self.novel_feats = self.all_feats_dset[novel_idx, :]
        self.novel_labels = self.all_labels[novel_idx]
        self.frac = float(len(base_classes)) / float(len(novel_classes) + len(base_classes))
    def sample_base_class_examples(self, num):
        sampled_idx = np.sort(np.random.choice(self.base_class_ids, num, replace=False))
        return (torch.Tensor(self.all_feats_dset[sampled_idx, :]),
                torch.LongTensor(self.all_labels[sampled_idx].astype(int)))
    def sample_novel_class_examples(self, num):
        sampled_idx = np.random.choice(self.novel_labels.size, num)
        return (torch.Tensor(self.novel_feats[sampled_idx, :]),
                torch.LongTensor(self.novel_labels[sampled_idx].astype(int)))
    def get_sample(self, batchsize):
        num_base = round(self.frac * batchsize)
        num_novel = batchsize - num_base
        base_feats, base_labels = self.sample_base_class_examples(num_base)
        novel_feats, novel_labels = self.sample_novel_class_examples(num_novel)
        return torch.cat((base_feats, novel_feats)), torch.cat((base_labels, novel_labels))
    def featdim(self):
        return self.novel_feats.shape[1]

def training_loop(lowshot_dataset, num_classes, batchsize, maxiters):
    model = nn.Linear(lowshot_dataset.featdim(), num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=momentum, dampening=momentum, weight_decay=wd)
    loss_function = nn.CrossEntropyLoss()
    for i in range(maxiters):
        (x, y) = lowshot_dataset.get_sample(batchsize)
        optimizer.zero_grad()
        loss = loss_function(model(x), y)
        loss.backward()
        optimizer.step()
        if i % 100 == 0:
            print('{:d}: {:f}'.format(i, loss.item()))
    return model

def perelement_accuracy(scores, labels):
    topk_scores, topk_labels = scores.topk(5, 1, True, True)
    label_ind = labels.cpu().numpy()
    topk_ind = topk_labels.cpu().numpy()
    top1_correct = topk_ind[:, 0] == label_ind
    top5_correct = np.sum(topk_ind == label_ind.reshape((-1, 1)), axis=1)
    return top1_correct.astype(float), top5_correct.astype(float)

def eval_loop(data_loader, model, base_classes, novel_classes):
    model = model.eval()
    top1 = top5 = all_labels = None
    with torch.no_grad():
        for i, (x, y) in enumerate(data_loader):
            top1_this, top5_this = perelement_accuracy(model(x), y)
            top1 = top1_this if top1 is None else np.concatenate((top1, top1_this))
            top5 = top5_this if top5 is None else np.concatenate((top5, top5_this))
            all_labels = y.numpy() if all_labels is None else np.concatenate((all_labels, y.numpy()))
    is_novel = np.isin(all_labels, novel_classes)
    is_base = np.isin(all_labels, base_classes)
    is_either = is_novel | is_base
    return np.array([np.mean(top1[is_novel]), np.mean(top5[is_novel]), np.mean(top1[is_base]),
                     np.mean(top5[is_base]), np.mean(top1[is_either]), np.mean(top5[is_either])])


def main(argv):
    global lr, momentum, wd
    (lowshotmeta, experimentpath, experimentid, lowshotn, trainfile, testfile, testsetup, numclasses, lr, momentum, wd,
     maxiters, batchsize, outpath, seed, threads) = argv[:16]
    experimentid, lowshotn, testsetup, numclasses = int(experimentid), int(lowshotn), int(testsetup), int(numclasses)
    lr, momentum, wd = float(lr), float(momentum), float(wd)
    maxiters, batchsize, seed = int(maxiters), int(batchsize), int(seed)
    torch.set_num_threads(int(threads))
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    with open(lowshotmeta) as f:
        meta = json.load(f)
    with open(experimentpath.format(experimentid)) as f:
        exp = json.load(f)
    novel_idx = np.array([row[:lowshotn] for row in exp], dtype=object)
    if testsetup:
        novel_classes, base_classes = meta['novel_classes_2'], meta['base_classes_2']
    else:
        novel_classes, base_classes = meta['novel_classes_1'], meta['base_classes_1']
    novel_idx = np.sort(np.concatenate([np.asarray(novel_idx[c], dtype=np.int64) for c in novel_classes]))
    with h5py.File(trainfile, 'r') as f:
        lowshot_dataset = LowShotDataset(f, base_classes, novel_classes, novel_idx)
        model = training_loop(lowshot_dataset, numclasses, batchsize, maxiters)
    with h5py.File(testfile, 'r') as f:
        loader = torch.utils.data.DataLoader(SimpleHDF5Dataset(f), batch_size=1000, shuffle=False)
        accs = eval_loop(loader, model, base_classes, novel_classes)
    with open(outpath, 'w') as f:
        json.dump(dict(lr=lr, wd=wd, expid=experimentid, lowshotn=lowshotn, accs=accs.tolist()), f)


if __name__ == "__main__":
    main(sys.argv[1:])
