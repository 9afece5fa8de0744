"""What the bridge adds per device type: supplied config spaces and the
config fields a driver may write."""

from __future__ import annotations

import struct

import pytest

from bridge.cli import build_parser, device_configs
from bridge.device_types import DEVICE_TYPES, DeviceOptions, virtio_fs_config


def test_the_virtio_fs_config_is_the_tag_and_the_request_queue_count():
    config = virtio_fs_config(DeviceOptions(fs_tag="myfs"), num_queues=2)
    assert len(config) == 40
    assert config[:36] == b"myfs" + bytes(32)
    assert struct.unpack_from("<I", config, 36)[0] == 1  # queue 0 is hiprio
    assert struct.unpack_from("<I", virtio_fs_config(DeviceOptions(), 5), 36)[0] == 4
    full = "t" * 36  # exactly 36 bytes: no terminator, as the spec allows
    assert virtio_fs_config(DeviceOptions(fs_tag=full), 2)[:36] == full.encode()
    with pytest.raises(ValueError, match="1 to 36 bytes"):
        virtio_fs_config(DeviceOptions(fs_tag="t" * 37), 2)


def test_fs_is_virtio_id_26_with_a_supplied_config_and_blk_keeps_its_own():
    fs, blk = DEVICE_TYPES["fs"], DEVICE_TYPES["blk"]
    assert (fs.virtio_id, fs.config_size, fs.default_num_queues) == (26, 0, 2)
    assert fs.supplied_config is virtio_fs_config
    assert blk.supplied_config is None
    assert not fs.config_write_allowed(0, 4)  # the tag is the device's
    assert blk.config_write_allowed(32, 1) and not blk.config_write_allowed(0, 8)


def test_the_cli_takes_a_tag_that_fits():
    parser = build_parser()
    args = parser.parse_args(["--domid", "1", "--socket", "/s", "--device", "fs", "--fs-tag", "share"])
    [device] = device_configs(args, parser)
    assert (device.device_type.name, device.options.fs_tag) == ("fs", "share")
    args = parser.parse_args(["--domid", "1", "--device", "fs:/a,fs-tag=one", "--device", "fs:/b"])
    assert [d.options.fs_tag for d in device_configs(args, parser)] == ["one", "fs0"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--domid", "1", "--socket", "/s", "--fs-tag", "x" * 37])
