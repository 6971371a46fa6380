"""Registry, config loading and the CLI."""
import dataclasses
import json
from pathlib import Path

import pytest

import mmalign
from mmalign.cli import main
from mmalign.config import ConfigError, describe_config, load_config
from mmalign.jobs import SampleJobConfig
from mmalign.registry import Registry, RegistryError
from mmalign.samplers import SamplerConfig

ROOT = Path(__file__).resolve().parents[1]


def test_registry_register_get_list_and_reject_duplicates():
    reg = Registry("widget")
    reg.register("a", 1, description="one")

    @reg.register("b")
    def make_b():
        return 2

    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    assert reg.get("a") == 1 and reg.get("b") is make_b
    assert reg.describe() == {"a": "one", "b": ""}
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.register("a", 3)
    with pytest.raises(RegistryError, match=r"unknown widget 'bb'.*did you mean 'b'"):
        reg.get("bb")
    with pytest.raises(RegistryError, match="non-empty"):
        reg.register("", 1)


def test_registry_lazy_targets_import_on_first_get():
    reg = Registry("thing")
    reg.register("join", "os.path:join")
    import os.path

    assert reg.get("join") is os.path.join


def test_list_functions_show_what_exists():
    assert {"sd", "sdxl", "sd3", "flux", "wan", "cogvideox", "audioldm"} <= set(mmalign.list_models())
    assert {"ode", "flow_grpo", "dance", "cps", "ddim", "ddpm",
            "best_of_n", "reno", "search", "reward_guidance"} == set(mmalign.list_samplers())
    assert isinstance(mmalign.list_rewards(), list) and isinstance(mmalign.list_trainers(), list)
    from mmalign.registry import SAMPLERS

    assert SAMPLERS.get("dance")(num_steps=3) == SamplerConfig(method="dance", num_steps=3)


@dataclasses.dataclass
class Inner:
    lr: float = 1e-4
    """Learning rate."""
    name: str = "x"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 3
    tags: list[str] = dataclasses.field(default_factory=list)
    window: tuple[int, int] | None = None


def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  name: y\n")
    cfg = load_config(Outer, f, ["inner.lr=3", "tags=[a, b]", "window=[1, 2]"])
    assert cfg == Outer(Inner(lr=3.0, name="y"), 5, ["a", "b"], (1, 2))
    assert isinstance(cfg.inner.lr, float)
    # PyYAML reads "1e-5" (no dot) as a string: float fields take it as the number it is
    assert load_config(Outer, None, ["inner.lr=1e-5"]).inner.lr == 1e-5
    f.write_text("inner:\n  lr: 2E3\n")
    assert load_config(Outer, f).inner.lr == 2000.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.lrr=1"], r"unknown config key\(s\) inner.lrr \(did you mean inner.lr\?\)"),
        (["steps=abc"], "steps: expected int, got str 'abc'"),
        (["steps=true"], "steps: expected int, got bool"),
        (["inner.lr=fast"], "inner.lr: expected float"),
        (["inner=3"], "inner: expected a mapping"),
        (["tags=[1]"], r"tags\[0\]: expected str"),
        (["window=[1]"], "window: expected"),
        (["steps"], "bad override 'steps'"),
        (["steps.x=1"], "steps: expected int, got dict"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, lst)


def test_config_validation_runs_post_init():
    with pytest.raises(ConfigError, match="sampler: .*num_steps must be a positive integer"):
        load_config(SampleJobConfig, None, ["sampler.num_steps=0"])
    rows = {r[0]: r for r in describe_config(SampleJobConfig)}
    assert "sampler.num_steps" in rows and rows["sampler.num_steps"][3] == "Number of denoising steps K."


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").glob("**/*.yaml"))
    assert files, "no shipped configs found"
    from mmalign.cli import config_kinds

    kinds = config_kinds()

    for f in files:
        kind = f.stem.split("_")[0]
        assert kind in kinds, f"{f.name}: config file names start with one of {sorted(kinds)}"
        load_config(kinds[kind], f)


def test_cli_errors_are_messages_not_tracebacks(capsys):
    for argv, needle in [
        (["bogus"], "invalid choice"),
        (["sample", "nope=1"], "unknown config key(s) nope"),
        (["sample", "model.name=tiny:nope"], "unknown model adapter 'nope'"),
        (["sample", "prompts=[]"], "prompt list is empty"),
        (["sample", "prompts_file=/nonexistent.txt"], "does not exist"),
        (["bench", "nothing"], "unknown benchmark 'nothing'"),
        (["train"], "not available"),
    ]:
        with pytest.raises(SystemExit) if argv == ["bogus"] else _no_raise() as exc:
            code = main(argv)
        out = capsys.readouterr().err
        assert needle in out, (argv, out)
        assert "Traceback" not in out
        code = exc.value.code if argv == ["bogus"] else code
        assert code == 2, argv


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_sample_writes_grid_and_records(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["sample", "model.name=tiny:sd3", "sampler.num_steps=2", f"out={out}", "prompts=[a cat, a dog, a cow]", "batch_size=2"])
    assert code == 0
    assert (out / "grid.png").is_file() and len(list(out.glob("sample_*.png"))) == 3
    summary = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in summary["samples"]] == ["a cat", "a dog", "a cow"]
    from PIL import Image

    assert Image.open(out / "sample_000.png").size == (32 * 4, 32 * 4)


def test_cli_sample_model_flag(tmp_path):
    out = tmp_path / "m"
    assert main(["sample", "--model", "tiny:sd", "sampler.num_steps=1", f"out={out}", "prompts=[a cat]"]) == 0
    assert json.loads((out / "samples.json").read_text())["family"] == "sd"
