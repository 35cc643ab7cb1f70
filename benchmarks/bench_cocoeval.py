"""COCO box evaluation time: pycocotools against faster-coco-eval on a generated 5,000-image result set.

The set looks like a detector's output on COCO val: 5,000 images (a few without objects) with 1-20 ground-truth
boxes each over 80 sparse category ids (COCO's 1..90 with gaps; 1% crowd regions), and up to ``--dets`` detections
per image (100: effdet's ``max_det_per_image``), scores rounded to 5 decimals as ``to_coco_results`` writes them,
some images without any. Each round times ``tasks.detection.coco_backends.run_cocoeval`` (what ``coco_map`` runs:
load the results, evaluate, accumulate, summarize) with each backend, in a new random order per round, as wall and
process CPU time (CPU time is the figure to trust on a busy machine); faster-coco-eval's index of the ground truth is
built on its first call and reused after, as during training, so that first call is reported apart. The 12
``stats`` of both are compared.

Run: ``python3 benchmarks/bench_cocoeval.py [--quick] [--images 5000] [--dets 100] [--rounds 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import time
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import numpy as np

COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]  # COCO's 80 ids


def generate(num_images: int, dets: int, seed: int = 0) -> tuple[Any, list[dict[str, Any]]]:
    """A pycocotools ``COCO`` ground truth and a results list (see the module docstring)."""
    from pycocotools.coco import COCO

    rng = random.Random(seed)
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        w, h = rng.choice([(640, 480), (640, 427), (500, 375), (480, 640)])
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        n_gt = 0 if rng.random() < 0.02 else rng.randint(1, 20)
        n_det = 0
        for _ in range(n_gt):
            bw, bh = w * rng.betavariate(1.2, 4), h * rng.betavariate(1.2, 4)  # mostly small, some large
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            c = rng.choice(COCO_IDS)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, bw, bh],
                         "area": bw * bh * 0.8, "iscrowd": int(rng.random() < 0.01)})  # fmt: skip
            if rng.random() < 0.7:
                jit = [rng.gauss(0, 0.1 * max(bw, bh)) for _ in range(4)]
                box = [x + jit[0], y + jit[1], max(1.0, bw + jit[2]), max(1.0, bh + jit[3])]
                label = c if rng.random() < 0.8 else rng.choice(COCO_IDS)
                results.append({"image_id": image_id, "category_id": label, "bbox": box,
                                "score": round(rng.uniform(0.3, 1.0), 5)})  # fmt: skip
                n_det += 1
        if rng.random() < 0.03:
            continue  # no detections on this image
        for _ in range(max(0, dets - n_det)):  # low-scoring false positives fill up to the detector's maximum
            bw, bh = w * rng.betavariate(1.2, 4), h * rng.betavariate(1.2, 4)
            box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), max(1.0, bw), max(1.0, bh)]
            results.append({"image_id": image_id, "category_id": rng.choice(COCO_IDS), "bbox": box,
                            "score": round(rng.uniform(0.0, 0.5), 5)})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": str(c)} for c in COCO_IDS]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def main(argv: list[str] | None = None) -> None:
    """Time both backends interleaved, compare their stats, print and save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--images", type=int, default=None, help="images (default 5000; 500 with --quick)")
    parser.add_argument("--dets", type=int, default=100, help="detections per image (at most)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 1
    common.setup(args)
    if not (common.importable("pycocotools") and common.importable("faster_coco_eval")):
        print("[skip] needs pycocotools and faster-coco-eval (pip install faster-coco-eval)")
        return
    from tasks.detection.coco_backends import run_cocoeval

    num_images = args.images or (500 if args.quick else 5000)
    t0 = time.perf_counter()
    coco, results = generate(num_images, args.dets, args.seed)
    print(f"generated {num_images} images, {len(coco.dataset['annotations'])} ground-truth boxes, "
          f"{len(results)} detections in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    ids = sorted(coco.getImgIds())
    times: dict[str, list[float]] = {"pycocotools": [], "faster-coco-eval": []}
    cpu: dict[str, list[float]] = {"pycocotools": [], "faster-coco-eval": []}
    stats: dict[str, np.ndarray] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    run_cocoeval(coco, results, ids, backend="faster-coco-eval")  # builds and caches faster-coco-eval's index
    first_faster, first_faster_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  faster-coco-eval, first call: {first_faster:.2f} s wall, {first_faster_cpu:.2f} s CPU", flush=True)
    for _ in range(args.rounds):
        for backend in random.sample(list(times), len(times)):
            t0, c0 = time.perf_counter(), time.process_time()
            stats[backend] = np.asarray(run_cocoeval(coco, results, ids, backend=backend).stats[:12])
            times[backend].append(time.perf_counter() - t0)
            cpu[backend].append(time.process_time() - c0)
            print(f"  {backend}: {times[backend][-1]:.2f} s wall, {cpu[backend][-1]:.2f} s CPU", flush=True)
    diff = float(np.abs(stats["pycocotools"] - stats["faster-coco-eval"]).max())
    med = {b: (statistics.median(times[b]), statistics.median(cpu[b])) for b in times}
    (slow, slow_cpu), (fast, fast_cpu) = med["pycocotools"], med["faster-coco-eval"]
    print(f"\n== COCOeval (bbox), {num_images} images, {len(results)} detections; median of {args.rounds} rounds")
    print(f"{'backend':<20}{'wall s':>10}{'CPU s':>10}   wall s of every round")
    for b, ts in times.items():
        print(f"{b:<20}{med[b][0]:>10.2f}{med[b][1]:>10.2f}   {', '.join(f'{t:.2f}' for t in ts)}")
    first = f"{first_faster:.2f} s, CPU {first_faster_cpu:.2f} s"
    print(f"faster-coco-eval first call (builds its ground-truth index): {first}")
    print(f"speed-up: {slow / fast:.1f}x wall, {slow_cpu / fast_cpu:.1f}x CPU (first call: {slow / first_faster:.1f}x)")
    exact = np.array_equal(*stats.values())
    print(f"12 stats: max |difference| {diff:.3g} (bitwise identical: {exact})")
    print("AP, AP50, AP75:", ", ".join(f"{v:.4f}" for v in stats["pycocotools"][:3]))
    payload = {
        "images": num_images, "detections": len(results), "times_s": times, "cpu_s": cpu,
        "first_faster_s": first_faster, "first_faster_cpu_s": first_faster_cpu, "speedup_wall": slow / fast,
        "speedup_cpu": slow_cpu / fast_cpu, "stats": {b: s.tolist() for b, s in stats.items()}, "max_abs_diff": diff,
    }  # fmt: skip
    common.write_json("cocoeval", args, payload)


if __name__ == "__main__":
    main()
