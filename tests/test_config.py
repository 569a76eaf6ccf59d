"""Settings come from the environment; every one of them is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from samvad.config import Settings, _env_name

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_environment_is_read() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "HOST": "127.0.0.1",
            "GOOGLE_CLOUD_PROJECT": "proj",
            "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8085",
            "SAMVAD_HISTORY_CAP": "50",
            "SAMVAD_FLUSH_INTERVAL": "2.5",
        }
    )
    assert (settings.port, settings.host, settings.project) == (9000, "127.0.0.1", "proj")
    assert settings.emulator_host == "127.0.0.1:8085"
    assert (settings.history_cap, settings.flush_interval) == (50, 2.5)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"SAMVAD_HISTORY_CAP": "0"}, "SAMVAD_HISTORY_CAP"),
        ({"SAMVAD_MAX_MESSAGE_BYTES": str(10**9)}, "SAMVAD_MAX_MESSAGE_BYTES"),
        ({"SAMVAD_RETRY_BASE": "5", "SAMVAD_RETRY_MAX": "1"}, "SAMVAD_RETRY_MAX"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Settings.from_env(env)


@pytest.mark.parametrize("field", list(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    assert f"`{_env_name(field)}`" in README or _env_name(field) in README
