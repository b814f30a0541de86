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


def test_sections_check_their_own_fields():
    """A section made on its own is checked (not only through Config), with the same messages."""
    from nightsift.engine.config import DetectConfig, DiscoverConfig, RunConfig, SubtractConfig

    with pytest.raises(ConfigError, match=r"config detect\.threshold: must be > 0"):
        DetectConfig(threshold=0.0)
    with pytest.raises(ConfigError, match=r"config run\.backend: must be numpy, cupy or auto"):
        RunConfig(backend="tpu")
    with pytest.raises(ConfigError, match=r"config subtract\.fft_dtype: must be float32 or float64"):
        SubtractConfig(fft_dtype="float16")
    with pytest.raises(ConfigError, match=r"config discover\.drift_bins: must be >= 2"):
        DiscoverConfig(drift_bins=1)
    with pytest.raises(ConfigError, match=r"config \[detect\]: must be a DetectConfig"):
        Config(detect={"threshold": 5.0})


def test_each_enumeration_is_one_literal():
    """The choices of a field are its Literal type; the tuples other modules check against and the
    command line's choices are derived from it."""
    import typing

    from nightsift.engine import backend, config
    from nightsift.engine.cli import build_parser

    hints = typing.get_type_hints(config.ClassifyConfig)
    assert typing.get_args(hints["backend"]) == config.CLASSIFY_BACKENDS
    assert typing.get_args(typing.get_type_hints(config.RunConfig)["backend"]) == config.ARRAY_BACKENDS
    assert "BACKENDS" not in vars(backend)  # the array backends are config.ARRAY_BACKENDS only
    for name in config.ARRAY_BACKENDS:
        assert Config().replace(run={"backend": name}).run.backend == name
    engine = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
                  if a.dest == "engine")
    assert tuple(engine.choices) == config.NIGHT_ENGINES


def _config_reads():
    """``(section, field)`` pairs read somewhere in the package source outside config.py.

    A read is an attribute load ``X.<field>`` where ``X`` is ``<anything>.<section>`` (``cfg.detect``)
    or a name bound to the section in that module (:func:`_names_bound_to`); ``X`` may be
    ``<anything>.<name>`` for a bound attribute name (``self.run_cfg = config.run``).
    """
    import ast
    import dataclasses
    from pathlib import Path

    import nightsift.engine
    import nightsift.kernels

    sections = {f.name: f.default_factory.__name__ for f in dataclasses.fields(Config)}
    files = [p for pkg in (nightsift.engine, nightsift.kernels) for p in Path(pkg.__file__).parent.rglob("*.py")]
    reads = set()
    for path in files:
        if path.name == "config.py" and path.parent.name == "engine":
            continue
        tree = ast.parse(path.read_text())
        loads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)]
        for sec, cls_name in sections.items():
            bound = _names_bound_to(tree, sec, cls_name)
            reads |= {(sec, n.attr) for n in loads if _last_name(n.value) in bound
                      or (isinstance(n.value, ast.Attribute) and n.value.attr == sec)}
    return reads


def _last_name(expr) -> str | None:
    """``a.b.c`` -> ``"c"``, ``a`` -> ``"a"``, anything else -> None."""
    import ast

    if isinstance(expr, ast.Attribute):
        return expr.attr
    return expr.id if isinstance(expr, ast.Name) else None


def _names_bound_to(tree, sec: str, cls_name: str) -> set:
    """Names that hold section ``sec`` (class ``cls_name``) in a module: a parameter annotated with
    the class (or a ``config``/``cfg`` parameter of a function whose docstring names the class), and
    the target of an assignment of the section itself: ``X.<sec>``, ``getattr(X, "<sec>")``, a call
    of the class or ``replace`` of a section, or ``A or B`` / ``A if c else B`` of those."""
    import ast

    def is_section(expr) -> bool:
        if isinstance(expr, ast.Attribute):
            return expr.attr == sec
        if isinstance(expr, ast.BoolOp):
            return any(is_section(v) for v in expr.values)
        if isinstance(expr, ast.IfExp):
            return is_section(expr.body) or is_section(expr.orelse)
        if isinstance(expr, ast.Call):
            fn = _last_name(expr.func)
            return (fn == cls_name or (fn == "replace" and bool(expr.args) and is_section(expr.args[0]))
                    or (fn == "getattr" and len(expr.args) > 1 and isinstance(expr.args[1], ast.Constant)
                        and expr.args[1].value == sec))
        return False

    names = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(n) or ""
            for a in n.args.args + n.args.kwonlyargs:
                if (a.annotation is not None and cls_name in ast.unparse(a.annotation)) or (
                        a.annotation is None and a.arg in ("config", "cfg") and cls_name in doc):
                    names.add(a.arg)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None and is_section(n.value):
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                names.add(_last_name(t))
    return names - {None}


def test_every_config_field_is_read():
    """No dead option: every field of every section is read by the package (see _config_reads)."""
    import dataclasses

    reads = _config_reads()
    dead = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)
            if (s.name, f.name) not in reads]
    assert not dead, f"config fields nothing reads: {dead}"
