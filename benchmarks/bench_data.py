"""Data loading vs model step rate: can the seg and det training pipelines keep the model fed?

* seg: ``tasks.data.MaskDataModule`` training loader (decode, random crop to 256, flips, colour
  jitter, normalise, collate) at batch 4, on ISBI 2012 (512x512 grayscale PNG, in ``../shared``)
  or, when absent, a generated synthetic RGB set of 512x512 PNGs.
* det: ``tasks.data.CocoDataModule`` training loader (decode, letterbox to 512, augment, collate)
  at batch 2, on the raccoon COCO set (JPEGs up to 2000x1333, in ``../shared``) or a generated
  synthetic COCO set.

Both loaders run in the main process (``num_workers=0``), so the figure is images/s per
loading core. They are interleaved with the matching model training step (U-Net-B0 256x256
batch 4 and EfficientDet-D0 512x512 batch 2, ours when importable) so that the ratio
``data img/s / step img/s`` is measured under the same load: at or above 1, one worker keeps up;
otherwise about ``1 / ratio`` workers are needed (on a GPU the step is far faster, so the ratio
tells how many workers the GPU will need: the step rate scales, the loading rate per core does not).

Run: ``python3 benchmarks/bench_data.py [--quick]``
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch

SHARED = common.ROOT.parent / "shared" / "data"


def _cycle(make_loader: Callable[[], Any]) -> Callable[[], int]:
    """A call that returns the image count of the next batch, restarting the loader at its end."""
    state: dict[str, Iterator[Any]] = {"it": iter(make_loader())}

    def next_batch() -> int:
        try:
            batch = next(state["it"])
        except StopIteration:
            state["it"] = iter(make_loader())
            batch = next(state["it"])
        return int(batch["image"].shape[0])

    return next_batch


def seg_cases(tmp: Path, synthetic: bool) -> list[common.Case]:
    """Seg loader + U-Net-B0 train step."""
    from tasks.data import MaskDataModule

    batch = 4
    root = SHARED / "isbi2012_membrane"
    if root.is_dir() and not synthetic:
        dm, source = MaskDataModule(str(root), image_size=256, batch_size=batch, in_channels=1), "ISBI 2012"
    else:
        from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

        spec = SyntheticMaskSpec(num_train=32, num_val=4, size=512)
        root = generate_masks(tmp / "seg", spec)
        dm, source = MaskDataModule(str(root), image_size=256, batch_size=batch), "synthetic"
    dm.setup("fit")
    cases = [common.Case(f"seg data: {source}, crop 256, batch {batch}", _cycle(dm.train_dataloader), items=batch)]
    if common.importable("segmentation_models_pytorch"):
        import bench_unet_train as unet

        key = "ours" if common.importable("effbackbone.integrations.smp") else "tu-efficientnet_b0"
        x, y = torch.randn(batch, 3, 256, 256), torch.randint(0, 3, (batch, 256, 256))
        step, _ = unet.make_step(unet.build_unet(key), x, y)
        cases.append(common.Case(f"U-Net-B0 train step ({key}), 256, batch {batch}", step, items=batch))
    return cases


def det_cases(tmp: Path, synthetic: bool) -> list[common.Case]:
    """Det loader + EfficientDet-D0 train step."""
    from tasks.data import CocoDataModule

    batch = 2
    root = SHARED / "raccoon"
    if (root / "annotations").is_dir() and not synthetic:
        dm, source = CocoDataModule(str(root), image_size=512, batch_size=batch), "raccoon"
    else:
        from tasks.detection.synthetic import SyntheticCocoSpec

        spec = SyntheticCocoSpec(num_train=32, num_val=4)
        dm, source = CocoDataModule(str(tmp / "det"), image_size=512, batch_size=batch, synthetic=spec), "synthetic"
    dm.setup("fit")
    cases = [common.Case(f"det data: {source}, letterbox 512, batch {batch}", _cycle(dm.train_dataloader), items=batch)]
    if common.importable("effdet"):
        import bench_effdet

        builders = bench_effdet.builders("train")
        label = "ours" if "ours" in builders else "effdet tf_efficientdet_d0"
        bench = builders[label]().train()
        opt = torch.optim.AdamW(bench.parameters(), lr=1e-4)
        x, target = torch.randn(batch, 3, 512, 512), bench_effdet._targets(batch, 512)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            bench(x, target)["loss"].backward()
            opt.step()

        cases.append(common.Case(f"EfficientDet-D0 train step ({label}), 512, batch {batch}", step, items=batch))
    return cases


def main(argv: list[str] | None = None) -> None:
    """Both pipelines, each interleaved with its model step."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--synthetic", action="store_true", help="generated data even when ../shared/data exists")
    args = parser.parse_args(argv)
    common.setup(args)
    if not common.importable("tasks.segmentation.data") and not common.importable("tasks.detection.data"):
        print("[skip] nothing to run: tasks.data is not importable")
        return
    groups: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = (("seg", seg_cases, "tasks.segmentation.data"), ("det", det_cases, "tasks.detection.data"))
        for name, make, module in cases:
            if not common.importable(module):
                continue
            cases = make(Path(tmp), args.synthetic)
            common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
            rows = common.summarize(cases, cases[-1].name)
            title = f"{name}: data loading (1 process) vs training step"
            common.print_table(title, rows)
            if len(rows) == 2:
                ratio = rows[0]["items_per_s"] / rows[1]["items_per_s"]
                print(f"data img/s / step img/s = {ratio:.2f} (paired: {rows[0]['speedup_vs_ref']:.2f})")
            groups.append({"title": title, "rows": rows})
    common.write_json("data", args, {"groups": groups})


if __name__ == "__main__":
    main()
