"""The virtio-gpu flags of the command line and the gpu device type."""

from __future__ import annotations

import struct

import pytest

from bridge import cli
from bridge.device_types import DEVICE_TYPES, virtio_gpu_config


def configs(argv):
    parser = cli.build_parser()
    return cli.device_configs(parser.parse_args(argv), parser)


def test_the_gpu_type():
    gpu = DEVICE_TYPES["gpu"]
    assert (gpu.virtio_id, gpu.config_size, gpu.default_num_queues) == (16, 16, 2)
    assert gpu.config_write_allowed(4, 4)  # events_clear
    assert not gpu.config_write_allowed(8, 4)  # num_scanouts is the front-end's
    # vhost-user-gpu leaves num_scanouts 0; the guest sees one scanout and the daemon's capsets
    assert virtio_gpu_config(struct.pack("<4I", 1, 2, 0, 3)) == struct.pack("<4I", 0, 0, 1, 3)


def test_gpu_options_from_flags_and_from_device_specs(tmp_path):
    [dev] = configs(["--domid", "1", "--device", "gpu", "--socket", "/s", "--gpu-resolution", "800x600",
                     "--gpu-output", str(tmp_path), "--gpu-png-every-flush", "--gpu-cursor",
                     "--gpu-http", "127.0.0.1:8080"])
    o = dev.options
    assert (o.gpu_resolution, o.gpu_output, o.gpu_png_every_flush, o.gpu_cursor, o.gpu_http) == (
        (800, 600), str(tmp_path), True, True, ("127.0.0.1", 8080))
    blk, gpu = configs(["--domid", "1", "--device", "blk:/b", "--device",
                        f"gpu:/g,gpu-resolution=640x480,gpu-output={tmp_path}"])
    assert gpu.options.gpu_resolution == (640, 480) and gpu.options.gpu_output == str(tmp_path)
    assert gpu.options.gpu_http is None and not gpu.options.gpu_png_every_flush
    [dev] = configs(["--domid", "1", "--device", "gpu", "--socket", "/s"])
    assert dev.options.gpu_resolution == (1024, 768) and dev.options.gpu_output is None


@pytest.mark.parametrize("flags,message", [
    (["--gpu-resolution", "800"], "WIDTHxHEIGHT"),
    (["--gpu-resolution", "8x8"], "16 to 4095"),
    (["--gpu-resolution", "5000x100"], "16 to 4095"),
    (["--gpu-output", "/nonexistent/dir"], "not a directory"),
    (["--gpu-http", "0.0.0.0:8080"], "loopback only"),
    (["--gpu-http", "127.0.0.1:0"], "loopback only"),
    (["--gpu-png-every-flush"], "needs --gpu-output"),
])
def test_bad_gpu_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--domid", "1", "--device", "gpu", "--socket", "/s", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_live_view_is_for_one_gpu_device(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--domid", "1", "--device", "blk", "--socket", "/s", "--gpu-http", "127.0.0.1:8080"])
    assert "exactly one gpu device" in capsys.readouterr().err
