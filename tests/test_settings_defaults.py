"""settings.toml's [default] section and the Settings model state the same defaults."""

from __future__ import annotations

import tomllib

from server.config import Settings
from server.resources import SETTINGS_FILE


def test_every_default_in_settings_toml_matches_the_model():
    defaults = tomllib.loads(SETTINGS_FILE.read_text())["default"]
    fields = Settings.model_fields
    unknown = sorted(set(defaults) - set(fields))
    assert unknown == [], f"settings.toml names settings the model does not know: {unknown}"
    different = {
        name: (value, fields[name].default)
        for name, value in defaults.items()
        if fields[name].default != value
    }
    assert different == {}, f"settings.toml vs Settings defaults differ: {different}"


def test_every_setting_of_the_model_has_a_default_in_settings_toml():
    defaults = tomllib.loads(SETTINGS_FILE.read_text())["default"]
    internal = {"env", "FIRESTORE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"}
    missing = sorted(set(Settings.model_fields) - set(defaults) - internal)
    assert missing == [], f"settings without a default in settings.toml: {missing}"
