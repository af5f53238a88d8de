"""Credentials in URL userinfo, paths and queries never reach logs, camera ids, metric labels or Kafka keys."""

from __future__ import annotations

import logging

import pytest

from oddeye.redact import redact_path, redact_text, redact_url, url_origin
from oddeye.sources.rtsp import RtspSource, default_camera_id

SECRET = "Zx9secret"


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            f"rtsp://cam:554/user=admin_password={SECRET}_channel=1_stream=0.sdp",
            "rtsp://cam:554/user=admin_password=***_channel=1_stream=0.sdp",
        ),
        (f"rtsp://cam/live?password={SECRET}", "rtsp://cam/live?password=***"),
        (f"rtsp://cam/live?user=bob&pass={SECRET}&ch=2", "rtsp://cam/live?user=bob&pass=***&ch=2"),
        (f"http://h/x?token={SECRET}&auth={SECRET}", "http://h/x?token=***&auth=***"),
        (f"rtsp://admin:{SECRET}@cam:554/a", "rtsp://admin:***@cam:554/a"),
        (f"rtsp://cam/live;pwd={SECRET}/sub", "rtsp://cam/live;pwd=***/sub"),
        (f"https://h/hook?api_key={SECRET}#{SECRET}", "https://h/hook?api_key=***"),
        ("rtsp://cam/live?password=", "rtsp://cam/live?password="),
        ("rtsp://cam/Streaming/101", "rtsp://cam/Streaming/101"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_camera_ids_from_urls_never_hold_credentials() -> None:
    url = f"rtsp://admin:{SECRET}@cam-7:554/user=admin_password={SECRET}_channel=1?token={SECRET}"
    cam = default_camera_id(url)
    assert SECRET not in cam
    assert cam == "cam-7:554/user=admin_password=***_channel=1"
    assert redact_path(f"/a/secret={SECRET}/b") == "/a/secret=***/b"


def test_rtsp_source_describe_and_logs_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    url = f"rtsp://127.0.0.1:9/user=admin_password={SECRET}_channel=1?pass={SECRET}"
    src = RtspSource(url=url, open_timeout_s=0.2, read_timeout_s=0.2, reconnect_initial_s=0.05, reconnect_max_s=0.1)
    assert SECRET not in src.camera_id and SECRET not in repr(src.describe())
    assert src.camera_id == "127.0.0.1:9/user=admin_password=***_channel=1"


def test_redact_text_and_origin() -> None:
    url = f"rtsp://u:{SECRET}@h/x?token={SECRET}"
    text = redact_text(f"cannot open {url}: 401 for u:{SECRET}; also see http://other/p?password={SECRET} now", [url])
    assert SECRET not in text and "rtsp://u:***@h/x?token=***" in text
    assert url_origin(f"https://u:{SECRET}@hooks.example.com:8443/T0/{SECRET}?x=1") == "https://hooks.example.com:8443"


def test_redacted_forms_reach_logs(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("oddeye.test")
    with caplog.at_level(logging.INFO):
        log.info("camera %s", default_camera_id(f"rtsp://cam/user=a_password={SECRET}"))
    assert SECRET not in caplog.text
