"""--device selection (runtime/devices.py): provider lists, clear errors, never a silent CPU fallback.

GPU providers do not exist on these machines, so availability is monkeypatched; the one real check
is that onnxruntime itself quietly runs a session on the CPU when told to use CUDA it lacks, and
that we refuse that session.
"""

from __future__ import annotations

import pytest

from skin_offline.errors import DeviceError, UsageError
from skin_offline.runtime import devices
from skin_offline.runtime.devices import CPU_EP, CUDA_EP, TRT_EP, Device, resolve

CPU_ONLY = ["AzureExecutionProvider", CPU_EP]
WITH_CUDA = [CUDA_EP, CPU_EP]
WITH_TRT = [TRT_EP, CUDA_EP, CPU_EP]


def names(choice):
    return [p if isinstance(p, str) else p[0] for p in choice.providers]


@pytest.mark.parametrize(
    "available,engines,expected",
    [
        (CPU_ONLY, False, Device.CPU),
        (WITH_CUDA, False, Device.CUDA),
        (WITH_TRT, False, Device.CUDA),  # TensorRT only with engines built (building takes minutes)
        (WITH_TRT, True, Device.TENSORRT),
    ],
)
def test_auto_picks_best_available(available, engines, expected):
    assert resolve("auto", available=available, has_engines=engines).device is expected
    assert resolve(None, available=available, has_engines=engines).device is expected


def test_provider_lists_in_priority_order():
    assert names(resolve("cpu", available=WITH_TRT)) == [CPU_EP]
    assert names(resolve("cuda", available=WITH_TRT)) == [CUDA_EP, CPU_EP]
    assert names(resolve("tensorrt", available=WITH_TRT)) == [TRT_EP, CUDA_EP, CPU_EP]
    trt = resolve("tensorrt", available=WITH_TRT, trt_options={"trt_fp16_enable": "True"})
    assert trt.providers[0] == (TRT_EP, {"trt_fp16_enable": "True"}) and trt.device is Device.TENSORRT


@pytest.mark.parametrize("device,needs", [("cuda", CUDA_EP), ("tensorrt", TRT_EP)])
def test_explicit_unavailable_device_is_an_error_not_a_fallback(device, needs):
    with pytest.raises(DeviceError) as e:
        resolve(device, available=CPU_ONLY)
    msg = str(e.value)
    assert needs in msg and "skin-offline[gpu]" in msg and "Jetson" in msg and "\n" not in msg
    assert e.value.exit_code == 5
    if device == "tensorrt":
        assert "TensorRT" in msg.split(needs)[1]


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="auto, cpu, cuda, tensorrt"):
        resolve("gpu", available=WITH_CUDA)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cpu_onnxruntime_silently_falls_back_and_we_refuse_it(llava_model, monkeypatch):
    """onnxruntime (CPU build) given CUDAExecutionProvider only warns and runs on the CPU: must be an error."""
    from skin_offline.runtime.sessions import SessionFactory

    if CUDA_EP in devices.available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    monkeypatch.setattr(devices, "available_providers", lambda: WITH_CUDA)
    factory = SessionFactory(threads=1, device="cuda")
    assert names(factory.device) == [CUDA_EP, CPU_EP]
    with pytest.raises(DeviceError, match="could not start CUDAExecutionProvider"):
        factory.create(llava_model.bundle_dir / "vision.onnx")


def test_load_on_cpu_and_refusal_of_missing_gpu(llava_model):
    from skin_offline.runtime.pipeline import SkinVL

    m = SkinVL.load(llava_model.bundle_dir, threads=1, device="cpu")
    assert m.bundle.decoder.session.get_providers()[0] == CPU_EP
    if CUDA_EP not in devices.available_providers():
        with pytest.raises(DeviceError, match="onnxruntime-gpu"):
            SkinVL.load(llava_model.bundle_dir, threads=1, device="cuda")


def test_cli_ask_device_exit_codes(llava_model, tmp_path):
    from typer.testing import CliRunner

    from skin_offline.cli import app

    from conftest import random_image

    img = tmp_path / "x.png"
    random_image(0).save(img)
    run = CliRunner().invoke
    args = ["ask", str(img), "hi", "--bundle", str(llava_model.bundle_dir), "--max-new-tokens", "2"]
    assert run(app, args + ["--device", "cpu"]).exit_code == 0
    assert run(app, args + ["--device", "gpu"]).exit_code == 2
    if TRT_EP not in devices.available_providers():
        r = run(app, args + ["--device", "tensorrt"])
        assert r.exit_code == 5 and "TensorrtExecutionProvider" in r.output
