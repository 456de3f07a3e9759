"""The Grad-CAM figure: where two models look (captum's LayerGradCam on the last stage, layer3).

Works through quantized layers: captum only needs the forward pass and the gradient at layer3's output,
and the fake quantizers pass gradients straight through.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vaqkd.errors import VaqkdError


class GradcamError(VaqkdError):
    """The two runs, the image count or the output path do not make a figure."""


def load_run_model(run_dir: str | Path, device: torch.device, data_root: str | None = None):
    from vaqkd.rundir import load_run

    cfg, model, data = load_run(run_dir, device, ["train.device=cpu"], data_root=data_root)
    return model.eval(), data, cfg


def gradcam_maps(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heat maps (B, H, W) in [0, 1] for class `target`, upsampled to the input size."""
    from captum.attr import LayerGradCam

    cam = LayerGradCam(model, model.layer3)
    a = cam.attribute(x, target=target, relu_attributions=True)  # (B, 1, 8, 8)
    a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    a = a - a.amin((1, 2), keepdim=True)
    return (a / a.amax((1, 2), keepdim=True).clamp_min(1e-12)).detach()


def gradcam_figure(run_a: str, run_b: str, images: int = 8, out: str = "gradcam.png", data_root: str | None = None,
                   seed: int = 0, force: bool = False) -> Path:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    from vaqkd.data.build import data_root as root_of
    from vaqkd.data.cifar import UnsafePickleError, class_names
    from vaqkd.rundir import check_file_target

    out_path = Path(out)
    if out_path.is_dir():
        raise GradcamError(f"--out {out}: is a directory; give a file name (e.g. {out_path / 'gradcam.png'})")
    if not out_path.suffix:  # matplotlib would add .png itself: name the file it writes
        out_path = out_path.with_name(out_path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if out_path.suffix[1:].lower() not in formats:  # said before the models are loaded, not after the figure
        raise GradcamError(f"--out {out}: {out_path.suffix} is not an image format matplotlib writes "
                           f"({', '.join(sorted(formats))})")  # fmt: skip
    if not out_path.parent.is_dir():
        raise GradcamError(f"--out {out}: {out_path.parent} is not a folder")
    check_file_target(out_path, "gradcam.png", force=force)  # an existing figure only with --force
    device = torch.device("cpu")
    model_a, data, cfg = load_run_model(run_a, device, data_root)
    model_b, data_b, cfg_b = load_run_model(run_b, device, data_root)
    if (cfg.data.dataset, data.num_classes) != (cfg_b.data.dataset, data_b.num_classes):
        a, b = f"{cfg.data.dataset} with {data.num_classes}", f"{cfg_b.data.dataset} with {data_b.num_classes}"
        raise GradcamError(f"{run_a} is a model of {a} classes, {run_b} of {b}: compare two models of the same classes")
    if images > len(data.test.labels):
        raise GradcamError(f"--images {images}: the test split of {run_a} has only {len(data.test.labels)} images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test.labels), generator=g)[:images]
    x_u8, y = data.test.images[idx], data.test.labels[idx]
    x = (x_u8.float() - data.test.mean) / data.test.std
    try:
        names = class_names(cfg.data.dataset, root_of(cfg.data))
    except UnsafePickleError:  # a meta file that would run code is said, not papered over
        raise
    except Exception:  # folder datasets and missing meta files: fall back to indices
        names = [str(i) for i in range(int(data.num_classes))]
    rows = []
    for model in (model_a, model_b):
        with torch.no_grad():
            pred = model(x).argmax(1)
        rows.append((pred, gradcam_maps(model, x, pred)))  # the map of each model's own decision
    fig, axes = plt.subplots(images, 3, figsize=(6.6, 2.2 * images), squeeze=False)
    label_a, label_b = Path(run_a).name, Path(run_b).name
    for i in range(images):
        img = x_u8[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(f"true: {names[y[i]]}", fontsize=8)
        for j, ((pred, maps), lab) in enumerate(zip(rows, (label_a, label_b)), start=1):
            axes[i, j].imshow(img)
            axes[i, j].imshow(maps[i].numpy(), cmap="jet", alpha=0.5)
            ok = "✓" if pred[i] == y[i] else "✗"
            axes[i, j].set_title(f"{lab[:22]}\n{names[pred[i]]} {ok}", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
