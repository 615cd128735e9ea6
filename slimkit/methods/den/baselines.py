"""The paper's baselines on the same tasks as DEN: DNN, DNN-L2, EWC, DNN-STL and DNN-MTL."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from slimkit.core.cost import count_params
from slimkit.core.globalstate import seed_global
from slimkit.engine.epochs import Hooks, Step, run_epochs
from slimkit.methods.den import steps as D
from slimkit.methods.den.config import DENConfig
from slimkit.methods.den.tasks import Task, score
from slimkit.models import create_model


def all_params(net) -> dict[str, None]:
    return {n: None for n, _ in net.named_parameters()}


def new_net(cfg: DENConfig, heads: tuple[int, ...], seed: int, device: str = "cpu"):
    seed_global(seed)  # built on the CPU: the same initial weights on every device
    io = dict(heads=heads, image_size=cfg.image_size, in_chans=1 if cfg.data == "digits" else 3)
    if cfg.channels:
        return create_model("den_conv", channels=cfg.channels, hidden=cfg.hidden, **io).to(device)
    return create_model("den_mlp", hidden=cfg.hidden, **io).to(device)


def fisher_diagonal(net, t: int, task: Task) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the hidden weights on task t (EWC)."""
    net.eval()
    fisher = {n: torch.zeros_like(p) for n, p in net.named_parameters() if n.startswith("hidden.")}
    dev = next(net.parameters()).device
    x, y = (t.to(dev) for t in task.train.tensors)
    for i in range(0, len(y), 64):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[i:i + 64], t), y[i:i + 64], reduction="sum").backward()
        for n, p in net.named_parameters():
            if n in fisher and p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
    net.zero_grad(set_to_none=True)
    return {n: f / len(y) for n, f in fisher.items()}


def sequential(name: str, tasks: list[Task], cfg: DENConfig, R: list[list[float]],
                         device: str = "cpu") -> int:
    """DNN / DNN-L2 / EWC: one network fine-tuned task after task (a new head per task)."""
    net = new_net(cfg, (), cfg.seed, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    fisher: dict[str, torch.Tensor] = {}
    ref = None
    for t, task in enumerate(tasks, 1):
        D.add_head(net, task.classes, gen)
        pen = D.Penalties()
        if t > 1 and name == "dnn-l2":
            pen = D.Penalties(l2_to=cfg.l2_baseline, ref=ref)
        elif t > 1 and name == "ewc":
            pen = D.Penalties(ewc=cfg.ewc_lambda, ref=ref, fisher=fisher)
        D.train_task(net, t, task.train, all_params(net), cfg.epochs, cfg.lr, cfg.batch_size, pen, seed=cfg.seed * 1000 + t)
        ref = D.snapshot(net)
        if name == "ewc":
            for n, f in fisher_diagonal(net, t, task).items():
                fisher[n] = fisher.get(n, torch.zeros_like(f)) + f
        R.append([score(net, j, tasks[j - 1]) for j in range(1, t + 1)])
    return count_params(net), count_params(net, nonzero=True)


def stl(tasks: list[Task], cfg: DENConfig, R: list[list[float]], device: str = "cpu") -> list[int]:
    nets, sizes = [], []
    for t, task in enumerate(tasks, 1):
        net = new_net(cfg, (task.classes,), cfg.seed + t, device)
        D.train_task(net, 1, task.train, all_params(net), cfg.epochs, cfg.lr, cfg.batch_size, None, seed=cfg.seed * 1000 + t)
        nets.append(net)
        sizes.append((count_params(net), count_params(net, nonzero=True)))
        R.append([score(nets[j - 1], 1, tasks[j - 1]) for j in range(1, t + 1)])
    return sizes


class _Joint(Hooks):
    """MTL's step: one batch of every task (as long as it has batches left), the tasks' losses summed."""

    def __init__(self, net, tasks: list[Task], batch_size: int, seed: int, device: str):
        self.net, self.tasks, self.batch_size, self.device = net, tasks, batch_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def batches(self, epoch: int):
        iters = [iter(DataLoader(t.train, batch_size=self.batch_size, shuffle=True, generator=self.gen)) for t in self.tasks]
        for _ in range(max(math.ceil(len(t.train) / self.batch_size) for t in self.tasks)):
            yield [next(it, None) for it in iters]

    def step(self, batch) -> Step:
        loss, n = 0.0, 0
        for t, b in enumerate(batch, 1):
            if b is None:
                continue
            x, y = b
            loss = loss + F.cross_entropy(self.net(x.to(self.device), t), y.to(self.device))
            n += len(y)
        return Step(loss, n)


def mtl(tasks: list[Task], cfg: DENConfig, device: str = "cpu") -> tuple[list[float], int]:
    """Joint training on every task at once: one shared body, a head per task, summed losses."""
    net = new_net(cfg, tuple(t.classes for t in tasks), cfg.seed, device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9)
    run_epochs(net, opt, _Joint(net, tasks, cfg.batch_size, cfg.seed, device), range(cfg.epochs))
    return [score(net, j, tasks[j - 1]) for j in range(1, len(tasks) + 1)], (count_params(net),
                                                                            count_params(net, nonzero=True))
