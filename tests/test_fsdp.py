"""Fully sharded data parallel (accelerate's FSDP2: torch's `fully_shard`) for posenc models, on CPU processes.

accelerate (1.x) shards only on accelerators. `AcceleratorState` switches to DistributedType.FSDP from the
multi-accelerator types (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...) only; CPU processes are MULTI_CPU (gloo), so on a
CPU-only machine `accelerate launch --config_file configs/accelerate_fsdp.yaml` trains plain DDP without a word (and an
FSDP1 config with sync_module_states fails in FullyShardedDataParallelPlugin: "There are currently no available devices
found"). torch's `fully_shard` itself runs on CPU over gloo. So this file checks, without a GPU:

- the configuration path: configs/accelerate_fsdp.yaml as `accelerate launch` reads it, the FSDP plugin it makes and
  its wrap policy on posenc models; the classes FSDP wraps (`_no_split_modules`) on every verified decoder;
  TrainingArguments(fsdp=..., fsdp_config=...) with a posenc model's layer classes;
- a sharded run: `hf-posenc train` on 2 CPU processes under `accelerate launch` with that file, where the worker lets
  AcceleratorState take its FSDP branch on gloo (the one thing changed; fully_shard wrapping, gathering the full state
  dict and saving are accelerate's and transformers' own code). Every parameter, the t5_bias table shared by all layers
  included, is split across the 2 processes, and the final model equals the DDP run's, which the same file gives
  unpatched.

Run as a script (`accelerate launch ... tests/test_fsdp.py [--shard] train ARGS`) this file is that worker.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE, ARCH_KWARGS, DECODERS
from transformers import AutoModelForCausalLM

from hf_posenc import archs
from hf_posenc.modeling.posenc_schemes import SCHEMES

pytestmark = pytest.mark.xdist_group("fsdp")  # one worker runs the two launches the module's tests share

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate_fsdp.yaml"
TRAIN_CONFIG = REPO / "configs" / "train_gpt2_alibi.yaml"
TRAIN_TINY = ["steps=4", "layers=1", "hidden_size=32", "heads=2", "seq_length=32", "batch_size=4", "logging_steps=2"]
#: a scheme with parameters shared by every layer: the table lives outside the decoder blocks, in FSDP's root group
SHARED_SCHEME = "t5_bias"
REPORT_DIR = "HF_POSENC_FSDP_REPORT"


# ---- the sharded run ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(tmp: Path, shard: bool) -> dict:
    """`hf-posenc train` (tiny GPT-2, t5_bias) on 2 CPU processes under `accelerate launch` with the FSDP config."""
    import subprocess

    out, reports = tmp / "run", tmp / "reports"
    reports.mkdir(parents=True)
    command = [*ACCELERATE, "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2"]
    command += ["--main_process_port", str(_free_port()), __file__, *(["--shard"] if shard else [])]
    command += ["train", "--config", str(TRAIN_CONFIG), *TRAIN_TINY, f"posenc={SHARED_SCHEME}"]
    command += [f"data={tmp.parent / 'text.txt'}", f"output_dir={out}"]
    env = os.environ | {REPORT_DIR: str(reports), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert "trained on 2 process(es)" in done.stdout, done.stdout[-2000:]
    ranks = [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(2)]
    return {"final": out / "final", "ranks": ranks}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same launch twice: with the worker's one change (FSDP2 on gloo), and as accelerate leaves it (DDP)."""
    if torch.cuda.is_available():
        pytest.skip("this checks CPU processes (gloo); a GPU machine would launch on its GPUs")
    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "text.txt").write_text("position is how a transformer knows word order.\n" * 400)
    return {"fsdp": _launch(tmp / "fsdp", shard=True), "ddp": _launch(tmp / "ddp", shard=False)}


def test_fsdp_shards_every_parameter_across_2_cpu_processes(runs):
    """Under FSDP2 each process holds half of every parameter (dim 0 split), the shared t5_bias table included."""
    ranks = runs["fsdp"]["ranks"]
    assert [r["distributed_type"] for r in ranks] == ["FSDP"] * 2
    assert all(r["world_size"] == 2 for r in ranks)
    names = list(ranks[0]["parameters"])
    assert any("position_bias" in name for name in names)  # the table shared by all layers, outside the blocks
    for name in names:
        full = ranks[0]["parameters"][name]["shape"]
        shards = [r["parameters"][name]["local"] for r in ranks]
        assert None not in shards, f"{name} is not sharded"
        assert sum(shard[0] for shard in shards) == full[0] and all(shard[1:] == full[1:] for shard in shards), name
        if full[0] > 1:
            assert all(shard[0] < full[0] for shard in shards), f"{name}: a process holds all of it"


def test_fsdp_final_model_loads_and_equals_the_ddp_run(runs):
    """The gathered full state dict saves a folder that loads as the posenc model, equal to the DDP run's result."""
    fsdp = AutoModelForCausalLM.from_pretrained(runs["fsdp"]["final"])
    ddp = AutoModelForCausalLM.from_pretrained(runs["ddp"]["final"])
    assert fsdp.config.posenc["type"] == SHARED_SCHEME
    reference = ddp.state_dict()
    for name, tensor in fsdp.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    ids = torch.randint(0, fsdp.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(fsdp(ids).logits).all()


def test_accelerate_trains_ddp_with_the_fsdp_config_on_cpu(runs):
    """What a CPU-only machine does with configs/accelerate_fsdp.yaml as it is: accelerate keeps MULTI_CPU (DDP over
    gloo), no parameter is sharded. When accelerate starts sharding CPU processes, this fails: the worker's change can
    go, and this file can launch plain `-m hf_posenc.cli`."""
    ranks = runs["ddp"]["ranks"]
    assert [r["distributed_type"] for r in ranks] == ["MULTI_CPU"] * 2
    assert all(p["local"] is None for r in ranks for p in r["parameters"].values())


def test_fsdp_final_folder_has_the_posenc_code(runs):
    """The FSDP2 final folder carries the same code as the DDP one (what `trust_remote_code` loads), not the code of
    torch's `FSDP<Model>` subclass that FSDP2 swaps in."""

    def code(folder: Path) -> list[str]:
        return sorted(path.name for path in folder.glob("*.py"))

    assert code(runs["fsdp"]["final"]) == code(runs["ddp"]["final"])


# ---- the configuration path (no process launched) --------------------------------------------------------------------


@functools.cache
def _launch_environment() -> dict[str, str]:
    """The FSDP_* / ACCELERATE_* variables `accelerate launch --config_file configs/accelerate_fsdp.yaml` gives each
    process (accelerate's own launcher code, which reads and checks the file)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    options = ["--config_file", str(FSDP_CONFIG), "--num_processes", "2", "--main_process_port", str(_free_port())]
    args = parser.parse_args([*options, "-m", "hf_posenc.cli"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_fsdp and not args.cpu and defaults.distributed_type == DistributedType.FSDP
    return prepare_multi_gpu_env(args)


def _decoder_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]


@pytest.mark.parametrize("scheme", ["alibi", SHARED_SCHEME, "kerple", "fire", "learned"])
@pytest.mark.parametrize("arch", DECODERS)
def test_config_file_wraps_each_decoder_layer(arch, scheme, monkeypatch):
    """configs/accelerate_fsdp.yaml asks for FSDP2, full state dicts and a block per decoder layer; the plugin the
    launched processes build from it wraps exactly the decoder layers of a posenc model (a scheme's shared parameters
    stay in the root group)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import AutoConfig

    environment = _launch_environment()
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # Trainer.save_model writes nothing otherwise
    assert environment["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in environment  # the model's own _no_split_modules, any architecture
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **ARCH_KWARGS[arch]), posenc=scheme)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == _decoder_layers(model) and len(wrapped) == model.config.num_hidden_layers
    assert not any(name.startswith(tuple(wrapped)) for name, _ in model.named_parameters() if "position_bias" in name)


def test_training_arguments_fsdp_accepts_posenc_layer_classes():
    """The Trainer route (`TrainingArguments(fsdp=True, fsdp_config=...)`, on the command line `hf-posenc train --fsdp
    --fsdp_config FILE.json`) takes a posenc model's layer classes by name, and the plugin Trainer builds from it wraps
    those layers."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import AutoConfig, TrainingArguments

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **ARCH_KWARGS["llama"]), posenc="t5_bias")
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": sorted(model._no_split_modules)}
    args = TrainingArguments(output_dir="unused", fsdp=True, fsdp_config=fsdp_config, use_cpu=True, report_to="none")
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if policy(module)] == _decoder_layers(model)


def test_posenc_keeps_the_wrap_classes_of_every_verified_decoder():
    """FSDP's default wrap (`_no_split_modules`) is the stock model's on every verified decoder, and the classes it
    names that the stock model has, the posenc one has too. (Some stock text models list classes they lack, e.g.
    qwen3_5_text its vision block: accelerate then refuses the default, and the config must name the layer class.)"""
    checked = 0
    for arch in archs.decoders():
        config = archs.small_config(arch, vocab_size=96, **archs.TEST_SIZE)
        stock = AutoModelForCausalLM.from_config(config)
        for scheme in ("nope", "alibi", "rope"):
            try:
                model = AutoModelForCausalLM.from_config(config, posenc=scheme)
                break
            except ValueError:
                continue
        else:
            continue
        wrap = set(stock._no_split_modules or ())
        assert set(model._no_split_modules or ()) == wrap, arch

        def present(m, wrap=wrap):
            return wrap & {type(module).__name__ for module in m.modules()}

        assert present(model) == present(stock) and present(model), arch
        checked += 1
    assert checked >= 0.9 * len(archs.decoders())


@pytest.mark.parametrize(
    "scheme",
    [name for name in sorted(SCHEMES) if name != "layers"],  # layers: a mix of the others
)
def test_no_scalar_parameters(scheme):
    """FSDP (1 and 2) refuses 0-dim parameters: "fully_shard doesn't support scalar parameters. Change c to a 1D tensor
    with numel equal to 1." (torch/distributed/fsdp/_fully_shard/_fsdp_init.py)."""
    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **ARCH_KWARGS["llama"]), posenc=scheme)
    assert [name for name, p in model.named_parameters() if p.dim() == 0] == []


# ---- the worker: `accelerate launch ... tests/test_fsdp.py [--shard] train ARGS` -------------------------------------


def _let_accelerate_shard_on_cpu() -> None:
    """Take AcceleratorState's FSDP branch on CPU processes too (accelerate keeps MULTI_CPU, i.e. DDP, there)."""
    from accelerate import state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies PartialState's fields over its own: keep them agreeing
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = __init__


def _report_parameters_after_training() -> None:
    """After Trainer.train, each process writes what it holds of every parameter: the full shape and, for a sharded
    one (a DTensor), its local shard's shape."""
    from torch.distributed.tensor import DTensor
    from transformers import Trainer

    train = Trainer.train

    def train_and_report(self, *args, **kwargs):
        outcome = train(self, *args, **kwargs)
        parameters = {
            name: {"shape": list(p.shape), "local": list(p.to_local().shape) if isinstance(p, DTensor) else None}
            for name, p in self.model.named_parameters()
        }
        report = {
            "distributed_type": self.accelerator.distributed_type.value,
            "world_size": self.args.world_size,
            "parameters": parameters,
        }
        path = Path(os.environ[REPORT_DIR]) / f"rank{self.args.process_index}.json"
        path.write_text(json.dumps(report))
        return outcome

    Trainer.train = train_and_report


def _worker(argv: list[str]) -> int:
    if argv and argv[0] == "--shard":
        argv = argv[1:]
        _let_accelerate_shard_on_cpu()
    _report_parameters_after_training()
    from hf_posenc.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
