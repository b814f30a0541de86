import pytest

from nightsift.engine.config import Config, load_config
from nightsift.engine.errors import ConfigError


def test_defaults_and_toml_override(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text("[detect]\nthreshold = 4\n[subtract]\ntile_size = 512\n")
    cfg = load_config(p)
    assert cfg.detect.threshold == 4.0 and isinstance(cfg.detect.threshold, float)
    assert cfg.subtract.tile_size == 512
    assert cfg.psf == Config().psf


@pytest.mark.parametrize("text, key", [
    ("[detect]\nthreshold = -1\n", "detect.threshold"),
    ("[detect]\nthresh = 5\n", "detect.thresh"),
    ("[nosuch]\na = 1\n", "nosuch"),
    ("[cutout]\nsize = 64\n", "cutout.size"),
    ("[run]\nbackend = 'tpu'\n", "run.backend"),
    ("[subtract]\ntile_size = 'big'\n", "subtract.tile_size"),
    ("[classify]\nthreshold_confidence = 1.0\n", "classify.threshold_confidence"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    p = tmp_path / "x.toml"
    p.write_text("[detect\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_replace_keeps_other_sections():
    c = Config().replace(detect={"threshold": 6.0})
    assert c.detect.threshold == 6.0 and c.subtract == Config().subtract
