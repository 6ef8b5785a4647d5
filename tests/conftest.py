"""Shared fixtures. Tests run single-threaded: on a busy 2-core host, tiny tensor ops are
orders of magnitude slower with two torch threads contending."""

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

# The slow tier (``-m slow``) of test files that other work in progress is rewriting: marked here
# by (file, test function) so this list does not edit them; everywhere else tests carry
# ``@pytest.mark.slow`` themselves. Seconds: measured on the 2-core CI host (--durations).
# tests/test_tiers.py checks that every entry still names a test function.
SLOW_ELSEWHERE = {
    ("test_gemv_splitk.py", "test_splitk_gemv_matches_reference_in_interpreter"): 75,
    ("test_gemv_splitk.py", "test_inline_ptx_kernels_build_for_sm90"): 19,
    ("test_groups.py", "test_grouped_kernels_match_reference_in_interpreter"): 61,
    ("test_prologue.py", "test_fused_decode_step_in_interpreter"): 57,
    ("test_prologue.py", "test_prologues_match_unfused_in_interpreter"): 6,
    ("test_fused_small.py", "test_fused_small_matches_reference_in_interpreter"): 23,
    ("test_kernels.py", "test_triton_kernels_in_interpreter"): 15,
    ("test_chat.py", "test_script_answers_two_prompts_on_cpu"): 8,
    ("test_policy.py", "test_every_triton_path_matches_the_reference_in_interpreter"): 8,
    ("test_distributed.py",
     "test_two_ranks_are_bit_identical_to_one_process_and_resume_after_a_dead_rank"): 38,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        if (item.path.name, name) in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)


WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch silent rivers "
         "flow under old stone bridges near green hills and bright towns").split()


def make_corpus(n_paragraphs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80)))
                       for _ in range(n_paragraphs))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=4096)


@pytest.fixture(scope="session")
def tiny_lattice_dir(tmp_path_factory):
    """A quickly trained 8to4 lattice (2 bits) in its own folder."""
    from liftquant.core.lattice_train import train_projection

    folder = tmp_path_factory.mktemp("lattices")
    res = train_projection("8to4", steps=120, batch=256, restarts=1, progress=False,
                           n_select=2000, seed=0)
    torch.save(res.M, folder / "8to4.pt")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with an offline word-level tokenizer, saved as an HF folder, plus a
    text file for calibration/perplexity."""
    from liftquant.models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(seed=0)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "corpus.txt").write_text(make_corpus())
    return folder
