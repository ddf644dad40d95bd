"""Options several commands share, typed once: each choice is an enum (typer lists and checks its values), so a
bad value is a usage error (exit 2) before any work starts. Ranges that a config object checks (sampling,
beam search, quantization) are left to that object, which raises errors.ConfigError (exit 2 as well)."""

from __future__ import annotations

import typer

from ..manifest import Manifest, Precision  # noqa: F401 (re-exported: commands import their option types here)
from ..runtime.devices import Device


def quiet_option():
    return typer.Option(False, "--quiet", help="no progress bars or messages on stderr (errors are still printed)")


# the int4 method options `export --precision int4` and `quantize` share
def quant_method_option():
    return typer.Option(
        None, help="int4/int8 weights: gptq (calibrated; the int4 default) or rtn (round to nearest, no calibration)"
    )


def scale_search_option():
    return typer.Option(
        None,
        "--scale-search/--no-scale-search",
        help="each block's scale by the error on calibration activations (default: on with gptq, off with rtn)",
    )


def calibration_images_option():
    return typer.Option(
        None,
        help="folder of your own lesion photos to calibrate int4 on (read, encoded, never stored or logged); "
        "default: generated images",
    )


def progress_for(quiet: bool):
    """The command's progress display: a bar on a terminal, plain lines in pipes and CI, nothing with --quiet."""
    from ..progress import Mode, Progress

    return Progress(Mode.QUIET if quiet else Mode.AUTO)


def bundle_option():
    return typer.Option(None, help="bundle folder (default: $SKIN_OFFLINE_BUNDLE or the user data dir)")


def precision_option(help: str = "pick a graph variant the bundle carries (default: the bundle's first)"):
    return typer.Option(None, help=help)


def device_option():
    return typer.Option(Device.AUTO, help="execution device (an unavailable one is an error, exit 5)")


def threads_option():
    return typer.Option(None, min=1, help="onnxruntime intra-op threads (default: the CPU count, at most 8)")


def frame_option():
    return typer.Option(0, min=0, help="frame of a multi-frame image (DICOM, TIFF pages, animations): 0 = the first")


def image_source(image, frame: int):
    """The image argument with its --frame, in the form SkinVL takes wherever it takes an image."""
    from ..runtime.image import ImageSource

    return ImageSource(image, frame)


RANDOM_WEIGHTS_WARNING = (
    "warning: this bundle was exported from random weights (a demo/test checkpoint); its answers mean nothing"
)


def warn_if_random(manifest: Manifest) -> None:
    """One line on stderr when the bundle came from a random-weight checkpoint (export/factory.py marks them)."""
    if manifest.random_weights:
        typer.echo(RANDOM_WEIGHTS_WARNING, err=True)


class ImageNotices:
    """The image loader's notices (e.g. text burned into the pixels) as `warning: ...` lines on stderr, each once per
    command (a chat reloads its image every turn)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def show(self, notices) -> None:
        for n in notices:
            if n not in self.said:
                self.said.add(n)
                typer.echo(f"warning: {n}", err=True)


def show_notices(model) -> None:
    """The bundle's one-line load notices (e.g. its int8 prefill graph left out for lack of RAM) on stderr."""
    for n in model.bundle.notices:
        typer.echo(f"note: {n}", err=True)
