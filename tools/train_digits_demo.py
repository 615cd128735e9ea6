"""Train the bundled demo checkpoint models/digits_resnet20.pt on the bundled digits set.

    python tools/train_digits_demo.py [--epochs 15] [--seed 0] [-o models/digits_resnet20.pt --force]

A plain dense training run (one generation, no Knowledge Evolution): the demo shows extraction,
not KE's accuracy. Prints and records dense test accuracy and the accuracy of the KELS fit
hypothesis cut out of it without any further training.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import slimkit
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import kels_plan
from slimkit.core.surgery import apply_plan
from slimkit.data.digits import digits
from slimkit.engine.evaluate import accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default="models/digits_resnet20.pt")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    size = 16
    train, test = digits("train", image_size=size), digits("test", image_size=size)
    model = slimkit.create_model("cifar_resnet", num_classes=10, depth=20, width=16, in_chans=1, image_size=size)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            # light augmentation: random shifts of up to 2 pixels
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} test acc {accuracy(model, test):.4f}", flush=True)
    model.eval()
    dense_acc = accuracy(model, test)
    slim = apply_plan(model, kels_plan(ChannelGraph(model, model.slimkit_spec.input_shape), 0.5))
    slim_acc = accuracy(slim, test)
    print(f"dense test acc {dense_acc:.4f}; KELS sr=0.5 fit hypothesis (no KE training) {slim_acc:.4f}; {time.time() - t0:.0f} s")
    slimkit.save(
        model, args.output, force=args.force,
        classes=[str(i) for i in range(10)],
        data={"name": "digits", "image_size": size, "in_chans": 1, "split_seed": 0, "test_fraction": 0.2,
              "scaling": "x/16*2-1"},
        metrics={"test_acc": dense_acc, "kels0.5_fit_test_acc_untrained": slim_acc, "epochs": args.epochs,
                 "seed": args.seed},
        provenance={"recipe": "tools/train_digits_demo.py", "trained": "dense, one generation (no KE)"},
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
