"""The three commands of the authors' README (github.com/Heliulu/LiftQuant, README.md at
01e88fd), copied verbatim, code blocks and line continuations included. Tests substitute only
the placeholders -- the paths, and the README's lattice placeholder ``n`` (its e2e command says
``--expc n`` and ``./Llama-2-7B+n.pth``) -- with :func:`argv_of`; nothing else is edited."""

import shlex

MAIN = r"""python main.py \
    --model /path/to/your/Llama-2-7B \
    --save_dir ./qmodels \
    --eval_ppl \
    --wbits 2 \
    --expc 20to8 \
    --w_sym \
    --abits 16 \
    --kbits 16 \
    --vbits 16 \
    --true-sequential \
    --act-order \
    --use_fpinps \
    --Rres_init Hadamard \
    --nsamples 4096 \
    --epochs 2 \
    --batch_size 2 \
    --calib_dataset redpajama \
    --usefullfp \
    --training_trans \
    --finetuning_weights \
    --align 1 \
    --lscale_lr 5e-3 \
    --lexw_lr 2e-2 \
    --lw_lr 2e-5 \
    --la_lr 2e-3 \
    --lt_lr 2e-4
"""

E2E = r"""CUDA_VISIBLE_DEVICES=0 python e2efinetune.py \
    --fp_model_path /path/to/your/Llama-2-7B \
    --quant_model_path ./Llama-2-7B+n.pth \
    --model_family Llama-2 \
    --wbits 2 \
    --expc n \
    --factor_a 100 \
    --factor_t 10 \
    --learning_rate 2e-5 \
    --dataset redpajama \
    --dataset_format pt \
    --output_dir ./output/e2e-qp-output/Llama-2-7B-redpajama-4096 \
    --do_train True \
    --pt_context_len 4096 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 8 \
    --logging_steps 1 \
    --save_strategy epoch \
    --training_strategy epochs \
    --evaluation_strategy steps \
    --eval_steps 200 \
    --max_train_samples 4096 \
    --num_train_epochs 1 \
    --eval_dataset_size 64 \
    --bf16 \
    --data_seed 42 \
    --max_grad_norm 0.3 \
    --eval_tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande \
    --preprocessing_num_workers 32 \
    --do_ppl_eval
"""

CHAT = r"""python chat/chat_bitblas_compile.py \
    --fp_model_path /path/to/your/fp_hf_model \
    --quant_model_path /path/to/your/quant_checkpoint
"""


def argv_of(command: str, script: str, substitutions: dict[str, str] | None = None) -> list[str]:
    """The arguments after ``script`` in ``command`` (env assignments and ``python`` dropped),
    each token equal to a key of ``substitutions`` replaced by its value."""
    tokens = shlex.split(command.replace("\\\n", " "))  # bash: backslash-newline joins lines
    rest = tokens[tokens.index(script) + 1:]
    subs = substitutions or {}
    return [subs.get(t, t) for t in rest]
