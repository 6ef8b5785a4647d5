"""torchrun (liftquant.quantize.distributed): two gloo ranks on CPU give a checkpoint bit-identical to
one process; a rank that dies leaves its finished blocks, which --resume picks up to the same
checkpoint; the block assignment is optimal among contiguous ranges; sequential propagation and
other unsplittable runs are refused up front in one line."""

import itertools
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, make_tokenizer
from safetensors.torch import load_file

from liftquant.quantize import distributed
from liftquant.quantize.distributed import assign_blocks, force_multicast_off, from_env, rank_time

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS = 4  # two blocks per rank, so a rank can die after its first one


# ------------------------------------------------------------------------------- assignment
def _best_contiguous(fp, quant, world):
    """Brute force: the smallest slowest-rank time over every split into contiguous ranges."""
    n, best = len(fp), float("inf")
    for cuts in itertools.combinations_with_replacement(range(n + 1), world - 1):
        bounds = [0, *cuts, n]
        ranges = [list(range(bounds[r], bounds[r + 1])) for r in range(world)]
        best = min(best, max(rank_time(fp, quant, r) for r in ranges))
    return best


def test_assignment_is_optimal_contiguous_and_covers_every_block_once():
    rng = random.Random(0)
    for _ in range(60):
        n, world = rng.randint(1, 7), rng.randint(1, 4)
        fp = [rng.uniform(0.1, 2.0) for _ in range(n)]
        quant = [rng.choice([0.0, rng.uniform(0.5, 30.0)]) for _ in range(n)]
        ranges = assign_blocks(fp, quant, world)
        assert len(ranges) == world
        assert [i for r in ranges for i in r] == list(range(n))  # contiguous, in rank order
        slowest = max(rank_time(fp, quant, r) for r in ranges)
        assert slowest == pytest.approx(_best_contiguous(fp, quant, world), rel=1e-12)
        assert assign_blocks(fp, quant, world) == ranges  # deterministic


def test_assignment_gives_late_ranks_fewer_blocks_and_skips_finished_ones():
    # 32 equal blocks, quantizing one costs 13 FP passes: rank 3 repeats 24+ FP passes first
    ranges = assign_blocks([1.0] * 32, [13.0] * 32, 4)
    sizes = [len(r) for r in ranges]
    assert sum(sizes) == 32 and sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    # finished blocks (--resume) cost their FP pass only: the rank owning them takes more
    resumed = assign_blocks([1.0] * 8, [0.0] * 4 + [13.0] * 4, 2)
    assert len(resumed[0]) > len(resumed[1]) and resumed[0][:4] == [0, 1, 2, 3]
    assert assign_blocks([1.0, 1.0], [5.0, 5.0], 4)[2:] == [[], []]  # more ranks than blocks


# ------------------------------------------------------------------------------- environment
def test_multicast_is_forced_off_even_against_the_user_setting():
    env = {"NCCL_NVLS_ENABLE": "1"}
    changed = force_multicast_off(env)
    assert env == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert changed == ("NCCL_NVLS_ENABLE=1 -> 0",)
    assert force_multicast_off(env) == ()


def test_torchrun_environment_is_read_and_bad_values_refused():
    assert from_env({}) is None and from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    ctx = from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (1, 2, 1, False)
    for env in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "2"}):
        with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
            from_env(env)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--propagate", "quantized"], "use --propagate fp (--use_fpinps"),
    (["--method", "rtn"], "--method rtn runs in one process"),
    (["--device", "cuda:1"], "pass --device cuda"),
])
def test_unsplittable_runs_are_refused_before_the_process_group(flags, needle, monkeypatch,
                                                                tmp_path, capsys):
    import main as main_script

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    code = main_script.main(["--model", "unused", "--save_dir", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out.exists() and not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    from liftquant.models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama4")
    tiny_llama(seed=0, num_hidden_layers=N_LAYERS).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "corpus.txt").write_text(make_corpus())
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str], save_dir: Path, **env) -> subprocess.Popen:
    """Two gloo ranks of main.py on this host (no network: 127.0.0.1, a free port)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), **env}
    if Path("/sys/class/net/lo").exists():
        full.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "main.py"), *argv, "--save_dir", str(save_dir)]
    return subprocess.Popen(cmd, env=full, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for k, value in x.items():
        assert value.dtype == y[k].dtype and torch.equal(value, y[k]), k


def test_two_ranks_are_bit_identical_to_one_process_and_resume_after_a_dead_rank(
        four_layer_dir, tiny_lattice_dir, tmp_path):
    import main as main_script

    argv = ["--model", str(four_layer_dir), "--calib_dataset", str(four_layer_dir / "corpus.txt"),
            "--expc", "8to4", "--lattice_dir", str(tiny_lattice_dir), "--nsamples", "8",
            "--seqlen", "32", "--epochs", "2", "--dtype", "float32", "--device", "cpu"]
    # a clean two-rank run, and one where rank 1 dies right after writing its first block (2)
    # (torchrun then stops rank 0 too), both while the one-process reference runs here
    two = _torchrun(argv, tmp_path / "two", NCCL_NVLS_ENABLE="1")
    killed = tmp_path / "killed"
    dying = _torchrun(argv, killed, **{distributed.FAULT_ENV: "1:1"})
    try:
        assert main_script.main([*argv, "--save_dir", str(tmp_path / "one")]) == 0
    finally:
        code, out = _finish(two)
        code_killed, out_killed = _finish(dying)
    assert code == 0, out[-3000:]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["summary"]["distributed"]["assignment"] == [[0, 1], [2, 3]]
    assert [(r["block"], r["rank"]) for r in report["blocks"]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    rank1_log = (tmp_path / "two" / "quantize.rank1.log").read_text()
    assert "NCCL_NVLS_ENABLE=1 -> 0" in rank1_log  # a user's 1 is overridden, and said so
    assert "NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in rank1_log

    assert code_killed != 0, out_killed[-3000:]
    assert f"exitcode  : {distributed.FAULT_EXIT}" in out_killed, out_killed[-3000:]
    blocks = killed / "blocks"
    assert (blocks / "block_002.safetensors").is_file()
    assert not (blocks / "block_003.safetensors").exists()
    assert not (killed / "model.safetensors").exists()
    code, out = _finish(_torchrun([*argv, "--resume"], killed))
    assert code == 0, out[-3000:]
    assert "block 3/4 resumed from" in out and "block 4/4 stage1" in out
    _assert_same_checkpoint(tmp_path / "one", killed)


def test_readme_torchrun_commands_parse():
    from liftquant.cli.config import RunConfig, apply_demo_defaults, build_parser

    text = (ROOT / "README.md").read_text()
    found = 0
    for line in text.splitlines():
        if "torchrun" in line and " main.py " in line and not line.startswith(("`", "*")):
            env, args = line.split(" main.py ", 1)
            assert "NCCL_NVLS_ENABLE=0" in env and "TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in env
            ns = build_parser("x").parse_args(args.split())
            apply_demo_defaults(ns)
            distributed.check_supported(RunConfig.from_args(ns))
            found += 1
    assert found >= 1


def test_bench_scale_relaunches_itself_under_torchrun_without_its_nproc_flag():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_scale
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for argv in (["--shape", "llama3-8b", "--nproc", "4", "--blocks", "8"],
                 ["--nproc=4", "--shape", "llama3-8b", "--blocks", "8"]):
        cmd = bench_scale.torchrun_command(4, argv)
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
        assert cmd[6].endswith("bench_scale.py")
        assert cmd[7:] == ["--shape", "llama3-8b", "--blocks", "8"]


def test_a_failed_rank_stops_the_others_with_one_line_naming_resume(monkeypatch, tmp_path):
    """The status exchange after the blocks (all_gather_object stands in for two ranks)."""
    def gather(status, mine):
        status[:] = [mine if r == ctx.rank else other for r in range(2)]

    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    ctx = distributed.DistContext(rank=0, world_size=2, local_rank=0)
    other = "FloatingPointError: block training produced non-finite losses"
    with pytest.raises(distributed.RankFailed) as err:
        distributed._exchange_status(ctx, None, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"rank 1: {other}") and "--resume" in msg and str(tmp_path) in msg
    assert isinstance(err.value, OSError)  # main.py reports it in one line
    distributed._exchange_status(ctx, "ValueError: mine", tmp_path)  # it re-raises its own
    other = None
    distributed._exchange_status(ctx, None, tmp_path)  # everyone fine: no error


def test_host_ram_share_is_split_between_the_ranks_of_a_host():
    from liftquant.cli.config import RunConfig
    from liftquant.quantize.cache import DEFAULT_BUDGET_FRACTION, available_host_bytes

    cfg = RunConfig()
    ctx = from_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert ctx.local_world_size == 4
    split = distributed.per_rank_host_budget(cfg, ctx)
    expected = DEFAULT_BUDGET_FRACTION * available_host_bytes() / 4 / 2**30
    assert split.calib.max_host_memory == pytest.approx(expected, rel=0.05)
    assert cfg.calib.max_host_memory is None  # the caller's config is left alone
    cfg.calib.max_host_memory = 3.0  # the user's cap is per process and kept
    assert distributed.per_rank_host_budget(cfg, ctx).calib.max_host_memory == 3.0
