"""What a user sees: the documented commands write where the docs say, each command says where it wrote,
help leads to the tasks, errors leave no empty run folders, and the logs carry no dependency noise.

The documented quickstart commands of docs/segmentation.md and docs/detection.md are read from the docs
and run as written (in a temporary working directory, shortened to one small epoch), so the docs'
paths are checked against a real run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shlex
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Shorten the documented runs: one batch of training and of validation, on a few generated images.
SEG_SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--data.synthetic.num_train=8", "--data.synthetic.num_val=4", "--data.synthetic.num_large=1"]  # fmt: skip
DET_SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--data.init_args.synthetic.num_train=8", "--data.init_args.synthetic.num_val=2"]  # fmt: skip
# What no command may print (dependency noise and our own former noise), see issue "quiet logs".
NOISE = ("litlogger", "LeafSpec", "torch.jit.script` is deprecated", "The dirpath has changed",
         "boxes doesn't contain any box", "overridden on_after_batch_transfer", "Total FLOPs: 0")  # fmt: skip


def documented_commands(doc: str, marker: str) -> tuple[list[list[str]], Path]:
    """The ``effbackbone`` commands of the doc's first bash block holding ``marker``, and its ``# ->`` folder."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S)
    block = next(b for b in blocks if marker in b and "# ->" in b).replace("\\\n", " ")
    commands, output = [], None
    for line in (raw.strip() for raw in block.splitlines()):
        if line.startswith("effbackbone"):
            args = shlex.split(re.sub(r"\s+#.*$", "", line))[1:]
            commands.append([str(REPO / a) if a.startswith("configs/") else a for a in args])
        elif line.startswith("# ->"):
            output = Path(re.match(r"[^\s{<,]+", line[4:].strip()).group(0))  # type: ignore[union-attr]
    assert commands and output is not None, f"no commands or '# ->' line in the {marker!r} block of {doc}"
    return commands, output


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_documented(doc: str, marker: str, short: list[str], cwd: Path) -> SimpleNamespace:
    """Run the documented commands in ``cwd``; collect what they print, log and warn."""
    commands, output = documented_commands(doc, marker)
    handler, printed = _Records(), {}
    logging.getLogger("lightning").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mp.chdir(cwd)
            for args in commands:
                extra = short if args[0] in ("fit", "predict") else []
                versions = set(cwd.glob("runs/*/lightning_logs/version_*"))
                with contextlib.redirect_stdout(io.StringIO()) as out:
                    assert main([*args, *extra]) == 0, args
                printed[args[0]] = out.getvalue()
                printed[f"{args[0]}_new_versions"] = sorted(set(cwd.glob("runs/*/lightning_logs/version_*")) - versions)
    finally:
        logging.getLogger("lightning").removeHandler(handler)
    text = "\n".join(str(v) for v in printed.values()) + "\n".join(handler.lines)
    text += "\n".join(str(w.message) for w in caught)
    return SimpleNamespace(cwd=cwd, output=cwd / output, printed=printed, all_text=text)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    return run_documented("docs/segmentation.md", "effbackbone predict", SEG_SHORT, tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    pytest.importorskip("effdet")
    return run_documented("docs/detection.md", "effbackbone predict", DET_SHORT, tmp_path_factory.mktemp("det"))


@pytest.mark.parametrize("run", ["seg_run", "det_run"])
def test_documented_predict_writes_to_the_documented_folder_and_says_so(run, request):
    result = request.getfixturevalue(run)
    files = sorted(p.name for p in result.output.iterdir())
    assert files, f"the docs name {result.output}, but nothing was written there"
    assert f"predictions: {result.output.relative_to(result.cwd)} ({len(files)} files" in result.printed["predict"]
    assert result.printed["predict_new_versions"] == []  # predict makes no lightning_logs/version_N
    assert not (result.output / "config.yaml").exists()


def test_segmentation_config_generates_its_data_on_first_use(seg_run):
    root = seg_run.cwd / "data" / "quickstart"
    assert (root / "classes.json").is_file() and len(list((root / "large" / "images").iterdir())) == 1
    assert len(list((root / "train" / "masks").iterdir())) == 8


def test_segmentation_predictions_have_a_panel_where_a_mask_exists(seg_run):
    assert sorted(p.name for p in seg_run.output.iterdir()) == [
        "large_0000_mask.png", "large_0000_overlay.png", "large_0000_panel.png"]  # fmt: skip


def test_fit_prints_checkpoints_metrics_and_writes_training_curves(seg_run):
    printed = seg_run.printed["fit"]
    version = seg_run.cwd / "runs" / "quickstart" / "lightning_logs" / "version_0"
    curves = version / "curves.png"
    assert "training curves: runs/quickstart/lightning_logs/version_0/curves.png" in printed
    assert curves.is_file() and curves.stat().st_size > 10_000 and (version / "metrics.csv").is_file()
    assert "checkpoints: " in printed and "last last.ckpt" in printed
    assert "metrics: runs/quickstart/lightning_logs/version_0/metrics.csv" in printed


@pytest.mark.parametrize("run", ["seg_run", "det_run"])
def test_no_dependency_noise_in_fit_and_predict(run, request):
    text = request.getfixturevalue(run).all_text
    assert "FLOPs of one forward" in text  # the summary's FLOPs are counted
    for noise in NOISE:
        assert noise not in text, noise


def test_validate_prints_where_the_metrics_went(seg_run, capsys, monkeypatch):
    monkeypatch.chdir(seg_run.cwd)
    ckpt = "runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt"
    config = str(REPO / "configs" / "segmentation" / "quickstart_unet_b0.yaml")
    assert main(["validate", "--config", config, "--ckpt_path", ckpt, *SEG_SHORT[2:]]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("metrics: "))
    assert (seg_run.cwd / line.removeprefix("metrics: ")).is_file()


def test_fast_dev_run_through_main_is_quiet(tmp_path, capsys, caplog):
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    root = generate_masks(tmp_path / "data", SyntheticMaskSpec(num_train=4, num_val=2, size=64))
    conf = REPO / "tests" / "conf" / "seg_unet_b0.yaml"
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(conf), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true",
                     "--trainer.enable_model_summary=true"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text + "\n".join(str(w.message) for w in caught)
    assert "FLOPs of one forward (3x64x64 input)" in text
    for noise in NOISE:
        assert noise not in text, noise


def test_quiet_filters_hold_only_inside_the_command():
    from tasks.cli import quiet_dependencies

    messages = ["`isinstance(treespec, LeafSpec)` is deprecated, use ...", "`torch.jit.script` is deprecated. Please"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_dependencies():
            for message in messages:
                warnings.warn(message, FutureWarning, stacklevel=1)
        assert caught == []
        warnings.warn(messages[1], FutureWarning, stacklevel=1)  # the library never filters globally
    assert len(caught) == 1


def test_help_header_names_tasks_data_modules_class_help_and_every_shipped_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    head = "\n".join(capsys.readouterr().out.splitlines()[:40])
    assert head.startswith("usage: effbackbone fit --config")
    classes = ("SegmentationTask", "MaskDataModule", "DetectionTask", "CocoDataModule")
    for text in (*classes, "--model.help tasks.segmentation.SegmentationTask", "--data.help tasks.segmentation."):
        assert text in head, text
    for config in sorted(REPO.glob("configs/*/*.yaml")):
        assert f"configs/{config.parent.name}/{config.name}" in head


def test_model_help_command_of_the_header_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "tasks.segmentation.SegmentationTask"])
    assert exit_info.value.code in (0, None) and "--model.variant" in capsys.readouterr().out


def test_missing_segmentation_root_says_the_folder_does_not_exist(tmp_path):
    conf = REPO / "tests" / "conf" / "seg_unet_b0.yaml"
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="does not exist") as error:  # jsonargparse wraps the data module's error
        main(["fit", "--config", str(conf), f"--data.root={missing}", f"--trainer.default_root_dir={tmp_path}"])
    assert f"segmentation data folder {missing} does not exist" in str(error.value)
    assert "num_classes is not set" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_error_before_training_leaves_no_empty_version_folder(tmp_path):
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    root = generate_masks(tmp_path / "data", SyntheticMaskSpec(num_train=4, num_val=2, size=64))
    for mask in (root / "train" / "masks").iterdir():  # fails in setup, after the logger made its folder
        mask.unlink()
    conf = REPO / "tests" / "conf" / "seg_unet_b0.yaml"
    logs = tmp_path / "logs"
    with pytest.raises(FileNotFoundError, match="has no mask"):
        main(["fit", "--config", str(conf), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={logs}"])  # fmt: skip
    assert not logs.exists()


def test_quickstart_config_and_command_generate_the_same_data():
    import yaml

    from tasks.quickstart import SPEC
    from tasks.segmentation.synthetic import SyntheticMaskSpec

    config = yaml.safe_load((REPO / "configs" / "segmentation" / "quickstart_unet_b0.yaml").read_text())
    spec = SyntheticMaskSpec(**config["data"]["init_args"]["synthetic"])
    assert asdict(spec) == asdict(SPEC)
    assert config["data"]["init_args"]["root"] == "data/quickstart"


def test_a_synthetic_spec_never_writes_into_a_folder_of_other_data(tmp_path):
    """The quickstart config with --data.root my_data trains on my_data: nothing generated, its own classes."""
    import json

    from tasks.quickstart import SPEC
    from tasks.segmentation.data import MaskDataModule
    from tasks.segmentation.synthetic import SyntheticMaskSpec, ensure_masks, generate_masks

    root = generate_masks(tmp_path / "mine", SyntheticMaskSpec(num_train=3, num_val=1, size=32, num_shapes=1))
    meta = json.loads((root / "classes.json").read_text())
    (root / "classes.json").write_text(json.dumps({"classes": ["sky", "kite"]}))  # a user's own dataset
    dm = MaskDataModule(str(root), synthetic=SPEC, image_size=32)
    dm.prepare_data()
    assert dm.synthetic is None and dm.class_names == ["sky", "kite"]
    assert len(list((root / "train" / "images").iterdir())) == meta["spec"]["num_train"]
    with pytest.raises(FileExistsError, match="not generated here"):
        ensure_masks(root, SPEC)


def test_generated_data_is_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "data/quickstart/" in ignored and "data/generated/" in ignored and "runs/" in ignored


def test_checkpoint_without_optimizer_state_predicts_and_exports(seg_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from tasks.export import load_task
    from tasks.segmentation.predict import predict_folder

    ckpt = torch.load(seg_run.cwd / "runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        ckpt.pop(key, None)
    stripped = tmp_path / "weights_only.ckpt"
    torch.save(ckpt, stripped)
    written = predict_folder(load_task(stripped), seg_run.cwd / "data" / "quickstart" / "large" / "images", tmp_path)
    assert len(written) == 3
    assert main(["export", "--ckpt", str(stripped), "--output", str(tmp_path / "m.onnx"), "--no-verify",
                 "--height", "64", "--width", "64"]) == 0  # fmt: skip
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000


@pytest.mark.parametrize("config", sorted(REPO.glob("configs/segmentation/*.yaml")), ids=lambda p: p.stem)
def test_shipped_segmentation_configs_parse(config, capsys):
    """Every segmentation recipe (with its progressive block, where it has one) is a valid config."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "tasks.segmentation.SegmentationTask" in capsys.readouterr().out
