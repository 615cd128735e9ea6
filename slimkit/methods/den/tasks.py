"""Task sequences for lifelong learning (split, permuted, one-vs-rest digits or an image folder) and their scores."""
from __future__ import annotations

import dataclasses
import re

import torch
from torch.utils.data import TensorDataset

from slimkit.core.errors import SlimkitError


@dataclasses.dataclass
class Task:
    name: str
    train: TensorDataset
    test: TensorDataset
    classes: int
    binary: bool  # scored by AUROC, as the paper scores its binary tasks


def _tensors(data: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from slimkit.data.digits import digits
    from slimkit.data.images import check_same_classes, image_dir
    from slimkit.data.loading import default_workers

    if data == "digits":
        tr, te = digits("train", image_size=image_size), digits("test", image_size=image_size)
    else:
        shape = (3, image_size, image_size)  # image folders give RGB
        tr, te = (image_dir(data, shape, split, workers=default_workers()) for split in ("train", "test"))
        check_same_classes(data, tr, te)
        tr, te = tr.prepare(), te.prepare()
    xs, ys = [], []
    for ds in (tr, te):
        if isinstance(ds, TensorDataset):
            xs.append(ds.tensors[0].float())
            ys.append(ds.tensors[1].long())
        else:
            items = [ds[i] for i in range(len(ds))]
            xs.append(torch.stack([x for x, _ in items]))
            ys.append(torch.tensor([int(y) for _, y in items]))
    return xs[0], ys[0], xs[1], ys[1]


def parse_tasks(spec: str, classes: int) -> tuple[str, int]:
    m = re.fullmatch(r"(split|onevsrest|permuted)(?::(-?\d+))?", spec.strip())
    if m is None:
        raise SlimkitError(f"unknown task spec {spec!r}; use split[:N], onevsrest[:N] or permuted:N")
    kind, n = m.group(1), m.group(2)
    if kind == "permuted" and n is None:
        raise SlimkitError("permuted needs a task count: permuted:N")
    n = int(n) if n is not None else (classes // 2 if kind == "split" else classes)
    if n < 1:
        raise SlimkitError(f"task count must be a positive integer, got {n} in {spec!r}")
    if kind == "split" and n > classes // 2:
        raise SlimkitError(f"split:{n} needs at least 2 classes per task, but the data has {classes} classes "
                           f"(at most split:{classes // 2})")
    if kind == "onevsrest" and n > classes:
        raise SlimkitError(f"onevsrest:{n} asks for more tasks than the data's {classes} classes")
    return kind, n


def make_tasks(spec: str, data: str = "digits", image_size: int = 8, seed: int = 0,
               train_per_class: int | None = None, subset_seed: int = 0) -> list[Task]:
    """The task sequence ``spec`` on ``data``: split[:N] (N tasks of consecutive classes), onevsrest[:N]
    (class c against the rest, binary) or permuted:N (all classes, one fixed pixel permutation per task;
    task 1 unpermuted), the permutations drawn from ``seed``. ``train_per_class``: a subset of the
    training split drawn from ``subset_seed``, at most that many images of every class (the same images
    as the other verbs' --train-per-class with the same --subset-seed)."""
    xtr, ytr, xte, yte = _tensors(data, image_size)
    if train_per_class is not None:
        from slimkit.data.select import per_class_subset

        pick = torch.as_tensor(per_class_subset(TensorDataset(ytr, ytr), train_per_class, subset_seed).indices)
        xtr, ytr = xtr[pick], ytr[pick]
    classes = int(max(ytr.max(), yte.max())) + 1
    kind, n = parse_tasks(spec, classes)
    tasks = []
    if kind == "split":
        per = classes // n
        for t in range(n):
            cs = list(range(t * per, (t + 1) * per))
            sel_tr, sel_te = torch.isin(ytr, torch.tensor(cs)), torch.isin(yte, torch.tensor(cs))
            tasks.append(Task(f"classes {cs[0]}-{cs[-1]}", TensorDataset(xtr[sel_tr], ytr[sel_tr] - cs[0]),
                              TensorDataset(xte[sel_te], yte[sel_te] - cs[0]), per, per == 2))
    elif kind == "onevsrest":
        for c in range(n):
            tasks.append(Task(f"{c} vs rest", TensorDataset(xtr, (ytr == c).long()),
                              TensorDataset(xte, (yte == c).long()), 2, True))
    else:
        g = torch.Generator().manual_seed(seed)
        d = xtr[0].numel()
        for t in range(n):
            perm = torch.arange(d) if t == 0 else torch.randperm(d, generator=g)
            tasks.append(Task(f"permutation {t}", TensorDataset(xtr.flatten(1)[:, perm].view_as(xtr), ytr),
                              TensorDataset(xte.flatten(1)[:, perm].view_as(xte), yte), classes, False))
    return tasks


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores, labels = scores.double(), labels.bool()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    s = scores[order]
    i = 0
    n = len(s)
    while i < n:  # average ranks over runs of equal scores
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def score(net, task_id: int, task: Task) -> float:
    """Accuracy, or AUROC for binary tasks, of head ``task_id`` with timestamped inference."""
    net.eval()
    x, y = task.test.tensors
    logits = net(x.to(next(net.parameters()).device), task_id).cpu()
    if task.binary:
        return auroc(torch.softmax(logits, 1)[:, 1], y)
    return float((logits.argmax(1) == y).float().mean())
