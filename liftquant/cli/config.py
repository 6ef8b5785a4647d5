"""One config system: flat, validated, versioned dataclasses shared by every entry script.

Each field becomes a ``--flag``: ``metadata["flag"]`` gives a descriptive primary spelling where
the field keeps the authors' name (``--lattice`` for ``expc``, ``--lr_signs`` for ``lw_lr``), and
``metadata["aliases"]`` adds further spellings (``--true-sequential``); the field name itself is
always accepted, so the seed's commands run unchanged and ``liftquant_run.json`` keys stay the
field names. Fields whose help starts with "compat:" are accepted for compatibility with the
authors' command line and documented as such. Booleans follow the HF-Trainer convention as well
as the flag one: ``--do_train``, ``--do_train True``, ``--bf16 False`` and ``--no-bf16`` all parse.

The groups every entry script shares -- :class:`DeviceArgs`, :class:`KernelArgs`,
:class:`EvalArgs` -- are defined once here and inherited by ``main.py``'s groups,
``e2efinetune.py`` (:class:`liftquant.apps.finetune.E2EArgs`) and ``scripts/eval.py``. The resolved
config is echoed to ``<save_dir>/liftquant_run.json``; ``--config run.json`` reads one back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
METHODS = ("liftquant", "rtn", "gptq")  # --method; rtn/gptq live in liftquant.quantize.baselines
DEMO_MODEL = "demo"  # --model demo (the default): SmolLM2-135M-Instruct fetched from PyPI
# Shortest calibration window accepted (--seqlen): the floor this toolkit has always enforced;
# the tests calibrate with 16-32 tokens. A perplexity window needs >= 2 tokens (one prediction).
MIN_SEQLEN = 8
MIN_EVAL_SEQLEN = 2
LEARNING_RATES = ("lexw_lr", "la_lr", "lscale_lr", "lw_lr", "lt_lr")  # TrainArgs, all >= 0
BACKENDS = ("auto", "torch", "triton", "bitblas")  # liftquant.kernels.registry names them too
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def _f(default, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),
       choices=None):
    """A config field; ``flag`` is its primary ``--spelling`` when it differs from the name."""
    return field(default=default, metadata={"help": help, "flag": flag, "aliases": aliases,
                                            "choices": choices})


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"expected True or False, got {text!r}")


class BoolFlag(argparse.Action):
    """``--x`` (True), ``--x True|False`` (HF-Trainer style, also 1/0, yes/no) and ``--no-x``."""

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        negated = [f"--no-{o[2:]}" for o in option_strings if o.startswith("--")]
        super().__init__([*option_strings, *negated], dest, nargs="?", default=default,
                         metavar="BOOL", help=help, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


def flag_names(f: dataclasses.Field) -> list[str]:
    """Every ``--spelling`` of field ``f``, primary first."""
    names = [f.metadata.get("flag") or f"--{f.name}", f"--{f.name}",
             *f.metadata.get("aliases", ())]
    return list(dict.fromkeys(names))


def flag_label(cls, name: str) -> str:
    """``--lattice/--expc``: how a message names field ``name`` of ``cls``, primary first."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return "/".join(flag_names(f)[:2])


def check_device(device: str) -> None:
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"--device {device!r}: give auto, cpu, cuda or cuda:<i>")


# --------------------------------------------------- groups shared by every entry script
@dataclass
class DeviceArgs:
    device: str = _f("auto", "device to run on: auto|cpu|cuda[:i]")


@dataclass
class KernelArgs:
    backend: str = _f("auto", "kernel backend of packed layers: auto (Triton on CUDA, torch on "
                      "CPU) | torch | triton | bitblas (falls back with a warning)",
                      choices=BACKENDS)


@dataclass
class EvalArgs:
    """Evaluation settings; the e2e seed spellings (``--do_ppl_eval``, ``--eval_dataset_size``,
    ``--per_device_eval_batch_size``) are aliases, so every script reads one vocabulary."""

    eval_ppl: bool = _f(False, "perplexity on --eval_dataset (main.py, e2efinetune.py: "
                        "before and after)", aliases=("--do_ppl_eval",))
    eval_dataset: str = _f("wiki-offline", "perplexity text: wiki-offline|wikitext2|c4|path",
                           aliases=("--ppl_dataset",))
    eval_seqlen: int = _f(2048, "perplexity window (GPTQ convention: 2048)",
                          aliases=("--ppl_seqlen",))
    eval_max_windows: int | None = _f(None, "cap on perplexity windows (None: all)",
                                      aliases=("--eval_dataset_size",))
    tasks: str | None = _f(None, "lm-eval tasks, comma-separated; the offline pack (boolq, "
                           "piqa, openbookqa, commonsense_qa, siqa, mmlu, or 'pack' for all) "
                           "runs without the hub (liftquant.evaluation.tasks)", aliases=("--eval_tasks",))
    tasks_limit: int | None = _f(None, "lm-eval: at most this many examples per task",
                                 aliases=("--eval_tasks_limit",))
    eval_batch_size: int = _f(16, "lm-eval requests per forward pass",
                              aliases=("--per_device_eval_batch_size",))


@dataclass
class ModelArgs(DeviceArgs):
    model: str = _f(DEMO_MODEL, "HF hub id, local folder, local .gguf file, or 'demo' "
                    "(SmolLM2-135M-Instruct from PyPI, cached)")
    gguf_file: str | None = _f(None, "GGUF file name inside --model (a folder)")
    dtype: str = _f("bfloat16", "dtype the FP model is loaded in",
                    choices=("bfloat16", "float16", "float32"))
    adapter: str | None = _f(None, "force a model-family adapter instead of config.model_type")


@dataclass
class CalibArgs:
    calib_dataset: str = _f("wiki-offline", "wiki-offline | wikitext2 | c4 | redpajama | "
                            "path to .txt/.jsonl")
    nsamples: int = _f(128, "calibration sequences (both stages unless overridden)")
    seqlen: int = _f(2048, "tokens per calibration sequence")
    stage1_nsamples: int | None = _f(None, "stage-1 (transform learning) sequences",
                                     aliases=("--nsamples1",))
    stage2_nsamples: int | None = _f(None, "stage-2 (block correction) sequences",
                                     aliases=("--nsamples2",))
    batch_size: int = _f(2, "sequences per optimisation step")
    seed: int = _f(0, "seed for calibration windows and training")
    cache_mode: str = _f("auto", "where block activations live: auto|cpu|pinned|disk",
                         choices=("auto", "cpu", "pinned", "disk"))
    cache_dir: str | None = _f(None, "folder for disk-backed activation caches")
    max_gpu_memory: float | None = _f(None, "GiB of accelerator memory the block loop may use; "
                                      "micro-batches and checkpointing are planned to fit, or "
                                      "the run is refused up front with the estimate")
    max_host_memory: float | None = _f(None, "GiB of host RAM the activation caches may use; "
                                       "beyond it they spill to a disk memmap (--cache_dir)")


@dataclass
class LatticeArgs:
    expc: str | None = _f(None, "lattice '<D>to<d>' (e.g. 24to10 = 2.4 bits)",
                          flag="--lattice")
    bits: float | None = _f(None, "bits/weight: a shipped rate is that lattice; a value "
                            "between shipped rates is met as an average by a per-layer mix")
    target_size_gb: float | None = _f(None, "a lattice per layer so the whole checkpoint "
                                      "(model.safetensors, in --save_dtype) fits this many GB")
    mix_lattices: str | None = _f(None, "comma-separated lattices a per-layer mix may use "
                                  "(e.g. 12to6,9to3; default: one per shipped rate, on CPU "
                                  "only those whose search is cheap there)")
    mix_proxy: str = _f("fisher", "per-layer mix: how a layer's lattice error is weighed; "
                        "fisher = its output error times the loss gradient there (a short FP "
                        "forward + backward), energy = its output error alone",
                        choices=("fisher", "energy"))
    lattice_dir: str | None = _f(None, "folder with <D>to<d>.pt lattices (default: shipped)")
    search: str = _f("auto", "nearest-code search", choices=("auto", "exhaustive", "pinv"))
    wbits: int | None = _f(None, "bits of the stage-1 uniform proxy (default floor(D/d))")
    w_sym: bool = _f(False, "compat: the proxy quantizer is always symmetric")
    method: str = _f("liftquant", "quantizer: liftquant, or the baselines rtn (round-to-nearest) "
                     "and gptq, run on the same model and calibration data",
                     choices=METHODS)
    baseline_bits: int = _f(4, "rtn/gptq: bits per weight of the integer codes (2..8)")
    group_size: int = _f(128, "rtn/gptq: input columns per scale/zero group (0: per-channel)")
    damp: float = _f(0.01, "gptq: Hessian damping as a fraction of its mean diagonal")
    first_token_weight: float | None = _f(None, "gptq: Hessian weight of each calibration "
                                          "window's first token, the attention sink (default "
                                          "liftquant.quantize.baselines.FIRST_TOKEN_WEIGHT; 1 = textbook "
                                          "GPTQ)")


@dataclass
class WhitenArgs:
    Rres_init: str = _f("Hadamard", "init of P1/P2: Hadamard|dct|identity|random",
                        flag="--rotation_init", choices=("Hadamard", "hadamard", "dct", "identity", "random"))
    training_trans: bool = _f(False, "compat: stage 1 always trains the whitening T unless "
                              "--stage1_epochs 0")
    s1_alpha: float = _f(0.5, "s1 init = mean|x|^alpha per input channel (AWQ-like)")


@dataclass
class TrainArgs:
    epochs: int = _f(2, "epochs of both stages unless overridden")
    stage1_epochs: int | None = _f(None, "epochs of stage 1", aliases=("--epochs1",))
    stage2_epochs: int | None = _f(None, "epochs of stage 2", aliases=("--epochs2",))
    lexw_lr: float = _f(2e-2, "stage-1 lr of the orthogonal factors P1/P2 (Cayley generators)",
                        flag="--lr_rotation")
    la_lr: float = _f(2e-3, "lr of s1/s2 (both stages)", flag="--lr_channel_scales")
    lscale_lr: float = _f(5e-3, "lr of the per-row scales (stage 2) and proxy clips (stage 1)",
                          flag="--lr_row_scales")
    lw_lr: float = _f(2e-5, "stage-2 lr of the latent sign weights", flag="--lr_signs")
    lt_lr: float = _f(2e-4, "stage-2 lr of the fused T* factors L, R", flag="--lr_transform")
    finetuning_weights: bool = _f(True, "train latent sign weights in stage 2")
    compute_dtype: str = _f("auto", "block-training compute dtype (parameters stay float32 "
                            "master copies): auto = bfloat16 on CUDA, float32 on CPU",
                            choices=("auto", "bfloat16", "float32"))
    deterministic: bool = _f(True, "deterministic CUDA kernels in block training, so the same "
                             "seed gives the same checkpoint (False: atomics allowed, a little "
                             "faster)")
    compile_proxy: bool | None = _f(None, "stage 1: form the proxy weights T^-1 Q(W T) through "
                                    "torch.compile (fused elementwise chain; compiles once per "
                                    "layer shape; needs a C++ compiler on CPU); unset: on for "
                                    "CUDA, off on CPU")
    holdout: int = _f(0, "calibration sequences held out for the reported error (0: 1/32 of "
                      "nsamples, at least 1)")
    propagate: str = _f("fp", "inputs of block i: 'fp' = FP model outputs (authors' default), "
                        "'quantized' = outputs of the already quantized blocks",
                        choices=("fp", "quantized"))
    use_fpinps: bool = _f(False, "compat: same as --propagate fp")
    align: int = _f(1, "compat: accepted; propagation is chosen by --propagate")
    usefullfp: bool = _f(False, "compat: targets are always the full-precision block outputs")
    true_sequential: bool = _f(False, "compat: all linears of a block are trained jointly",
                               aliases=("--true-sequential",))
    act_order: bool = _f(False, "--method gptq: quantize columns by decreasing Hessian "
                         "diagonal; unused by LiftQuant (compat)", aliases=("--act-order",))
    abits: int = _f(16, "activation bits (only 16 supported)")
    kbits: int = _f(16, "KV-cache key bits (only 16 supported)")
    vbits: int = _f(16, "KV-cache value bits (only 16 supported)")


@dataclass
class RunArgs(EvalArgs, KernelArgs):
    save_dir: str = _f("out/demo", "output checkpoint folder")
    save_dtype: str = _f("auto", "dtype of the unquantized tensors in the checkpoint (auto: as "
                         "computed; liftquant only)",
                         choices=("auto", "bfloat16", "float16", "float32"))
    resume: bool = _f(False, "continue an interrupted run from <save_dir>/blocks")
    overwrite: bool = _f(False, "replace an existing checkpoint in --save_dir (otherwise a "
                         "folder holding another run is refused)")
    config: str | None = _f(None, "read arguments from this JSON (CLI flags override)")
    debug: bool = _f(False, "on an error show the full traceback instead of one line")


GROUPS = {"model": ModelArgs, "calib": CalibArgs, "lattice": LatticeArgs,
          "whiten": WhitenArgs, "train": TrainArgs, "run": RunArgs}


def _type_of(f: dataclasses.Field):
    base = str(f.type).split("|")[0].strip()  # annotations are strings ("int | None")
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def add_dataclass_args(parser: argparse.ArgumentParser, cls, *, group: str) -> None:
    g = parser.add_argument_group(group)
    for f in dataclasses.fields(cls):
        kind = _type_of(f)
        names = flag_names(f)
        if kind is bool:
            g.add_argument(*names, dest=f.name, action=BoolFlag, default=None,
                           help=f"{f.metadata['help']} (default: {f.default})")
        else:
            g.add_argument(*names, dest=f.name, type=kind, default=None,
                           metavar=names[0][2:].upper() if not f.metadata.get("choices") else None,
                           choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']} (default: {f.default})")


def build_parser(description: str, groups=GROUPS) -> argparse.ArgumentParser:
    """Parser over the dataclasses: abbreviations off, unknown flags are errors."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for name, cls in groups.items():
        add_dataclass_args(p, cls, group=name)
    return p


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    calib: CalibArgs = field(default_factory=CalibArgs)
    lattice: LatticeArgs = field(default_factory=LatticeArgs)
    whiten: WhitenArgs = field(default_factory=WhitenArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    run: RunArgs = field(default_factory=RunArgs)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        t = self.train
        for name in ("abits", "kbits", "vbits"):
            if getattr(t, name) != 16:
                raise ValueError(f"--{name} {getattr(t, name)}: only 16 is supported "
                                 "(LiftQuant quantizes weights only)")
        if t.use_fpinps:
            t.propagate = "fp"
        check_device(self.model.device)
        self._check_finite()
        self._check_counts()
        self._check_learning_rates()
        self._check_rate_request()

    # validation (every message names the flag to change) -------------------------------
    def _check_finite(self) -> None:
        for name, group in GROUPS.items():
            for f in dataclasses.fields(group):
                v = getattr(getattr(self, name), f.name)
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{flag_label(group, f.name)} {v}: give a finite number")

    def _check_counts(self) -> None:
        c, t, r = self.calib, self.train, self.run
        floors = (  # (flag, value or None, smallest accepted, what it means / the fix)
            ("nsamples", c.nsamples, 2, "one sequence is held out for the reported error"),
            ("seqlen", c.seqlen, MIN_SEQLEN, "tokens per calibration window"),
            ("batch_size", c.batch_size, 1, "sequences per optimisation step"),
            ("stage1_nsamples", c.stage1_nsamples, 1, "omit it to use --nsamples"),
            ("stage2_nsamples", c.stage2_nsamples, 1, "omit it to use --nsamples"),
            ("epochs", t.epochs, 0, "0 skips training"),
            ("stage1_epochs", t.stage1_epochs, 0, "0 skips transform learning"),
            ("stage2_epochs", t.stage2_epochs, 0, "0 skips block correction"),
            ("holdout", t.holdout, 0, "0 holds out 1/32 of --nsamples"),
            ("wbits", self.lattice.wbits, 1, "omit it for floor(D/d)"),
            ("eval_seqlen", r.eval_seqlen, MIN_EVAL_SEQLEN, "tokens per perplexity window"),
            ("eval_max_windows", r.eval_max_windows, 1, "omit it to use every window"),
            ("eval_batch_size", r.eval_batch_size, 1, "lm-eval requests per forward pass"),
            ("tasks_limit", r.tasks_limit, 1, "omit it to use every example"),
        )
        for flag, value, low, hint in floors:
            if value is not None and value < low:
                raise ValueError(f"--{flag} {value}: must be >= {low} ({hint})")
        if t.holdout >= c.nsamples:
            raise ValueError(f"--holdout {t.holdout} leaves no training sequence out of "
                             f"--nsamples {c.nsamples}: give --holdout < --nsamples")
        for flag in ("max_gpu_memory", "max_host_memory"):
            value = getattr(c, flag)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag} {value}: must be > 0 GiB (omit it for no cap)")

    def _check_learning_rates(self) -> None:
        for flag in LEARNING_RATES:
            value = getattr(self.train, flag)
            if value < 0:
                raise ValueError(f"{flag_label(TrainArgs, flag)} {value}: a learning rate must "
                                 "be >= 0 (0 freezes those parameters)")

    def _check_rate_request(self) -> None:
        """Flag-level checks of --lattice/--bits/--target_size_gb (no torch, no files); the
        lattice file is checked by :meth:`check_lattice_file`, and whether a shipped lattice
        honours --bits by :func:`liftquant.quantize.rate.select_lattice`."""
        lat = self.lattice
        if sum(x is not None for x in (lat.expc, lat.bits, lat.target_size_gb)) > 1:
            raise ValueError("give at most one of --lattice/--expc, --bits, --target_size_gb")
        if lat.expc is not None:
            from liftquant.core.latticespec import LatticeSpec

            try:
                LatticeSpec.parse(lat.expc)
            except ValueError as exc:
                raise ValueError(f"--lattice/--expc: {exc}") from None
        if lat.bits is not None and lat.bits <= 0:
            raise ValueError(f"--bits {lat.bits}: must be > 0 bits per weight (e.g. --bits 2.5)")
        if lat.target_size_gb is not None and lat.target_size_gb <= 0:
            raise ValueError(f"--target_size_gb {lat.target_size_gb}: must be > 0 GB (the size "
                             "of the whole quantized checkpoint)")
        if lat.method not in METHODS:
            raise ValueError(f"--method {lat.method!r}: choose one of {', '.join(METHODS)}")
        if lat.method != "liftquant":
            if lat.bits is not None or lat.target_size_gb is not None:
                raise ValueError("--bits/--target_size_gb pick a LiftQuant lattice; with "
                                 f"--method {lat.method} give --baseline_bits")
            if not 2 <= lat.baseline_bits <= 8 or lat.group_size < 0 or lat.damp <= 0:
                raise ValueError("need 2 <= --baseline_bits <= 8, --group_size >= 0, --damp > 0")
            if lat.first_token_weight is not None and lat.first_token_weight <= 0:
                raise ValueError("--first_token_weight must be > 0 (1: textbook GPTQ)")

    def check_lattice_file(self) -> None:
        """Refuse a ``--lattice`` whose file is not in ``--lattice_dir`` (default: shipped);
        cheap (no torch), so entry scripts call it before they load anything."""
        lat = self.lattice
        if lat.expc is None or lat.method != "liftquant":
            return
        from liftquant.core.latticespec import check_lattice_file

        try:
            check_lattice_file(lat.expc, lat.lattice_dir)
        except FileNotFoundError as exc:
            raise ValueError(f"--lattice/--expc {lat.expc}: {exc}") from None

    # stage-resolved values -------------------------------------------------------------
    def stage_epochs(self, stage: int) -> int:
        v = self.train.stage1_epochs if stage == 1 else self.train.stage2_epochs
        return self.train.epochs if v is None else v

    def stage_nsamples(self, stage: int) -> int:
        v = self.calib.stage1_nsamples if stage == 1 else self.calib.stage2_nsamples
        return min(self.calib.nsamples, self.calib.nsamples if v is None else v)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"config format_version {version} != {FORMAT_VERSION}")
        kwargs = {}
        for name, sub in GROUPS.items():
            known = {f.name for f in dataclasses.fields(sub)}
            unknown = set(d.get(name, {})) - known
            if unknown:
                raise ValueError(f"unknown keys in config group {name!r}: {sorted(unknown)}")
            kwargs[name] = sub(**d.get(name, {}))
        return cls(**kwargs)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "RunConfig":
        base = {}
        if getattr(ns, "config", None):
            base = json.loads(Path(ns.config).read_text())
        merged = {}
        for name, sub in GROUPS.items():
            vals = dict(base.get(name, {}))
            for f in dataclasses.fields(sub):
                v = getattr(ns, f.name, None)
                if v is not None:
                    vals[f.name] = v
            merged[name] = vals
        return cls.from_dict(merged)


# Demo run (``python main.py`` with no model): sized to finish within ~15 minutes on a 2-core
# CPU (and well within 2 minutes on a GPU). Only fills values the user did not give.
# The CPU demo uses float32 (CPUs without bf16 units run bf16 several times slower) and 9to3
# (3 bits), whose exact search is one (B, 9) x (9, 512) matmul per chunk; 2-bit lattices lose
# too much with this little calibration (8to4 against 9to3: bench/demo/README.md).
DEMO_DEFAULTS_CPU = {"expc": "9to3", "dtype": "float32", "save_dtype": "bfloat16",
                     "nsamples": 32, "seqlen": 256, "batch_size": 4, "epochs": 2,
                     "eval_ppl": True, "eval_seqlen": 512, "eval_max_windows": 8}
DEMO_DEFAULTS_GPU = {"expc": "20to8", "nsamples": 64, "seqlen": 512, "batch_size": 4,
                     "epochs": 2, "eval_ppl": True, "eval_seqlen": 2048}


def apply_demo_defaults(ns: argparse.Namespace) -> None:
    """Fill demo-sized defaults into ``ns`` when no ``--model`` (or ``--model demo``) is given."""
    if getattr(ns, "model", None) not in (None, DEMO_MODEL) or getattr(ns, "config", None):
        return
    import torch

    defaults = DEMO_DEFAULTS_GPU if torch.cuda.is_available() and ns.device in (
        None, "auto") or (ns.device or "").startswith("cuda") else DEMO_DEFAULTS_CPU
    lattice_given = any(getattr(ns, k) is not None for k in ("expc", "bits", "target_size_gb"))
    for key, value in defaults.items():
        if key == "expc" and lattice_given:
            continue
        if getattr(ns, key, None) is None:
            setattr(ns, key, value)
