"""A test's real part (a binary, an extra) missing: skipped on a workstation, a failure on CI."""

from __future__ import annotations

import pytest

from tests.conftest import require_binary, require_module


def test_missing_binary_fails_on_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("no-such-binary-oddeye", "Debian package nothing")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_oddeye"):
        require_module("no_such_module_oddeye")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match=r"install-test-deps\.sh"):
        require_binary("no-such-binary-oddeye")
    assert require_binary("sh").endswith("/sh")
    require_module("json")
