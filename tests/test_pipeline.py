import json
import shutil

import pytest
import torch

from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import (
    CheckpointError,
    bits_report,
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.models import get_adapter, tiny_llama, tiny_qwen2
from liftquant.quantize.calibrate import quantize_model

SPEC = LatticeSpec.parse("8to4")


def _cfg(**train):
    return RunConfig(calib=CalibArgs(nsamples=12, seqlen=32, batch_size=2, seed=0),
                     lattice=LatticeArgs(expc="8to4"),
                     train=TrainArgs(**{"epochs": 2, "holdout": 2, **train}))


def _quantize(model, lattice_dir, *, cfg=None, blocks_dir=None, resume=False):
    cfg = cfg or _cfg()
    ids = torch.randint(0, model.config.vocab_size, (12, 32),
                        generator=torch.Generator().manual_seed(1))
    rows = quantize_model(model, ids, cfg=cfg, M=load_projection(SPEC, lattice_dir), spec=SPEC,
                          adapter=get_adapter(model.config), device=torch.device("cpu"),
                          blocks_dir=blocks_dir, resume=resume)
    return rows, ids


@pytest.fixture(scope="module")
def quantized_llama(tiny_lattice_dir):
    model = tiny_llama(seed=0)
    rows, ids = _quantize(model, tiny_lattice_dir)
    return model, rows, ids


def test_every_target_linear_replaced(quantized_llama):
    model, rows, _ = quantized_llama
    adapter = get_adapter(model.config)
    for block in adapter.get_blocks(model):
        for name in adapter.linear_names(block):
            assert isinstance(adapter.get_linear(block, name), PackedLiftLinear), name
    assert not isinstance(model.lm_head, PackedLiftLinear)
    assert len(packed_module_names(model)) == 7 * model.config.num_hidden_layers


def test_block_correction_beats_rounding(quantized_llama):
    _, rows, _ = quantized_llama
    for row in rows:
        assert row["holdout_corrected"] < row["holdout_rounded"], row
        assert row["holdout_packed"] == pytest.approx(row["holdout_corrected"], rel=0.05)
        assert row["stage2"]["loss_last"] < row["stage2"]["loss_first"]


def test_quantized_model_is_close_to_fp(quantized_llama):
    model, _, ids = quantized_llama
    ref = tiny_llama(seed=0)
    with torch.no_grad():
        out, want = model(ids[:2]).logits, ref(ids[:2]).logits
    rel = float((out - want).square().mean() / want.square().mean())
    assert rel < 0.5 and torch.isfinite(out).all()


def test_qwen2_with_biases(tiny_lattice_dir):
    model = tiny_qwen2(seed=0)
    rows, _ = _quantize(model, tiny_lattice_dir, cfg=_cfg(epochs=1))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLiftLinear) and q.bias is not None
    assert all(r["holdout_packed"] < 1.0 for r in rows)


def test_save_load_identical_logits_and_bits(quantized_llama, tmp_path, tiny_lattice_dir):
    model, _, ids = quantized_llama
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, tiny_lattice_dir),
                             quantized_modules=packed_module_names(model), not_converted=["lm_head"])
    save_quantized(model, None, tmp_path / "ckpt", qconfig=qc, report={"x": 1})
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "liftquant"
    assert cfg["quantization_config"]["lattice"] == "8to4"
    assert not list((tmp_path / "ckpt").glob(".tmp*")), "temp folder left behind"
    loaded, _ = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)
    bits = bits_report(loaded)["quantized_linears"]
    assert bits["bpw_codes"] == pytest.approx(2.0)  # 64 and 128 are multiples of d=4
    assert bits["bpw_total"] > bits["bpw_codes"]


def test_generate_works_after_load(quantized_llama, tmp_path, tiny_lattice_dir):
    model, _, ids = quantized_llama
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, tiny_lattice_dir),
                             quantized_modules=packed_module_names(model), not_converted=[])
    save_quantized(model, None, tmp_path / "c", qconfig=qc)
    loaded, _ = load_quantized(tmp_path / "c")
    out = loaded.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_corrupted_and_mismatched_checkpoints_rejected(quantized_llama, tmp_path,
                                                       tiny_lattice_dir):
    model, _, _ = quantized_llama
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, tiny_lattice_dir),
                             quantized_modules=packed_module_names(model), not_converted=[])
    good = save_quantized(model, None, tmp_path / "good", qconfig=qc)
    # truncated weights
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_quantized(bad)
    # config says another lattice than the tensors hold
    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    cfg = json.loads((mixed / "config.json").read_text())
    cfg["quantization_config"].update(lattice="16to8", lifted_dim=16, target_dim=8)
    (mixed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load_quantized(mixed)
    # future format version
    cfg["quantization_config"].update(lattice="8to4", lifted_dim=8, target_dim=4,
                                      format_version=99)
    (mixed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version"):
        load_quantized(mixed)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "nowhere")


def test_resume_reproduces_uninterrupted_run(tiny_lattice_dir, tmp_path):
    cfg = _cfg(epochs=1)
    full = tiny_llama(seed=0)
    _quantize(full, tiny_lattice_dir, cfg=cfg, blocks_dir=tmp_path / "blocks")
    assert (tmp_path / "blocks" / "block_001.safetensors").is_file()
    # simulate a run killed during block 1: only block 0 finished
    for p in (tmp_path / "blocks").glob("block_001*"):
        p.unlink()
    resumed = tiny_llama(seed=0)
    _quantize(resumed, tiny_lattice_dir, cfg=cfg, blocks_dir=tmp_path / "blocks", resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_quantized_propagation_mode(tiny_lattice_dir):
    model = tiny_llama(seed=0)
    rows, _ = _quantize(model, tiny_lattice_dir, cfg=_cfg(epochs=1, propagate="quantized"))
    assert len(rows) == 2 and all(r["holdout_packed"] < 1.0 for r in rows)


def test_size_estimate_equals_quantized_model_bytes(quantized_llama):
    from liftquant.quantize.rate import estimate_checkpoint_bytes

    model, _, _ = quantized_llama
    fresh = tiny_llama(seed=0)
    est = estimate_checkpoint_bytes(fresh, get_adapter(fresh.config), SPEC)
    assert bits_report(model)["total_bytes"] == est


def test_disk_activation_cache_gives_same_result(tiny_lattice_dir, tmp_path):
    cfg_ram, cfg_disk = _cfg(epochs=1), _cfg(epochs=1)
    cfg_disk.calib.cache_mode, cfg_disk.calib.cache_dir = "disk", str(tmp_path)
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    _quantize(a, tiny_lattice_dir, cfg=cfg_ram)
    _quantize(b, tiny_lattice_dir, cfg=cfg_disk)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert not list(tmp_path.iterdir()), "disk cache files left behind"


def test_load_with_dtype_casts_dense_tensors_only(quantized_llama, tmp_path, tiny_lattice_dir):
    model, _, ids = quantized_llama
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, tiny_lattice_dir),
                             quantized_modules=packed_module_names(model), not_converted=[])
    save_quantized(model, None, tmp_path / "c", qconfig=qc)
    loaded, _ = load_quantized(tmp_path / "c", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.scale.dtype == torch.float16 and q.packed_signs.dtype == torch.uint8


def test_checkpoints_rebuild_layers_with_their_block_shape_rule(tmp_path):
    """Layers are rebuilt with the block-shape rule recorded in the checkpoint: v1 checkpoints
    (written before v2) keep their shapes, new ones use v2, unknown rules are refused."""
    import json

    from transformers import LlamaConfig

    from liftquant.io.checkpoint import (
        BLOCK_SHAPE_RULE,
        CheckpointError,
        block_rule_of,
        build_skeleton,
        read_quantization_config,
    )

    config = LlamaConfig(hidden_size=64, intermediate_size=4864, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=32)
    qc = {"lifted_dim": 24, "target_dim": 10, "quantized_modules": ["model.layers.0.mlp.down_proj"]}
    old = build_skeleton(config, {**qc, "block_shape_rule": "whiten.block_shape/v1"},
                         dtype=torch.float32).get_submodule("model.layers.0.mlp.down_proj")
    new = build_skeleton(config, {**qc, "block_shape_rule": BLOCK_SHAPE_RULE},
                         dtype=torch.float32).get_submodule("model.layers.0.mlp.down_proj")
    assert BLOCK_SHAPE_RULE == "whiten.block_shape/v2"
    assert old.block_shape == (487, 10) and tuple(old.L.shape) == (487, 487)
    assert new.block_shape == (70, 70) and tuple(new.L.shape) == (70, 70)
    assert old.block_rule == "v1" and new.block_rule == "v2"
    assert new.storage_bits()["side_bits"] < old.storage_bits()["side_bits"] / 10
    assert block_rule_of({}) == "v1"  # no field: the only rule that existed before it
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "liftquant", "format_version": 1, "pack_layout": "signs_lsb_first_v1",
        "block_shape_rule": "whiten.block_shape/v7"}}))
    with pytest.raises(CheckpointError, match="upgrade liftquant"):
        read_quantization_config(folder)
