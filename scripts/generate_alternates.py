"""Write alternate plausible answers for a TOFU-format forget file, for AltPO (arXiv:2409.13474).

AltPO (``trainer=AltPO``) prefers, for each forget question, an alternate answer over the true one. TOFU
has no alternate answers: this script asks a model for them. For every row of ``--input`` (a JSON-lines
file in TOFU's format, e.g. ``forget10.json``) the model gets a prompt, built with the model config's
template (``data.utils.format_prompt``), holding the question and the true answer and asking for a
different answer that sounds just as plausible. The output has the same rows plus an
``alternate_answer`` column (a string, or a list of ``--num-alternates`` strings), written atomically
(a temporary file in the same folder, then a rename).

The output name defaults to ``<input stem>_alternate.json`` next to the input, which is the file the
dataset configs ``TOFU_QA_FORGET01/05/10_ALT`` read from ``paths.tofu`` (``forget10_alternate.json``):

    python scripts/generate_alternates.py --model-config SmolLM2-135M-Instruct \
        --model-path saves/finetune/target --input data/tofu/forget10.json
    python src/train.py --config-name=unlearn.yaml model=SmolLM2-135M-Instruct \
        model.model_args.pretrained_model_name_or_path=saves/finetune/target trainer=AltPO \
        data.forget=TOFU_QA_FORGET10_ALT data.retain=TOFU_QA_RETAIN90 paths.tofu=data/tofu

The paper generates the alternates with the model being unlearned (the fine-tuned "target"), so pass
the same model to both commands. Decoding is greedy by default (one alternate per question); with
``--sample`` it samples (``--temperature``, ``--top-p``), seeded by ``--seed``, which is required for
``--num-alternates`` above 1. Options: ``--output``, ``--max-new-tokens``, ``--batch-size``,
``--question-key`` / ``--answer-key`` / ``--alternate-key``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

log = logging.getLogger("generate_alternates")

INSTRUCTION = (
    "Question: {question}\n"
    "True answer: {answer}\n\n"
    "Write a different answer to this question: it must sound just as plausible and be written in the "
    "same style and length as the true answer, but state other facts. Reply with the new answer only."
)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a TOFU-format file: JSON lines (a JSON array is accepted too)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def write_rows_atomically(rows: list[dict[str, Any]], path: Path) -> None:
    """JSON lines to ``path`` via a temporary file in the same folder and a rename (never half-written)."""
    from run_folder import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def load_model_config(name: str, model_path: str | None) -> Any:
    """``cfg.model`` of ``model=<name>`` as src/train.py composes it (paths resolved)."""
    from hydra import compose, initialize_config_dir

    from resolvers import register_resolvers

    register_resolvers()
    overrides = [f"model={name}"]
    if model_path:
        overrides += [f"model.model_args.pretrained_model_name_or_path={model_path}",
                      f"model.tokenizer_args.pretrained_model_name_or_path={model_path}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="unlearn.yaml", overrides=overrides)
    return cfg.model


def generate(model: Any, tokenizer: Any, template: Any, rows: list[dict[str, Any]], question_key: str,
             answer_key: str, num_alternates: int, max_new_tokens: int, batch_size: int, sample: bool,
             temperature: float, top_p: float) -> list[list[str]]:
    """``num_alternates`` answers per row, in row order."""
    import torch

    from data.utils import answer_end_token_id, format_prompt

    prompts = [format_prompt(tokenizer, template, INSTRUCTION.format(question=r[question_key], answer=r[answer_key]))
               for r in rows]
    end_id = answer_end_token_id(tokenizer, template)
    gen_args: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=end_id,
                                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id,
                                    num_return_sequences=num_alternates, do_sample=sample)
    if sample:
        gen_args.update(temperature=temperature, top_p=top_p)
    else:  # plain greedy decoding, whatever the model's generation_config suggests
        gen_args.update(temperature=None, top_p=None, top_k=None)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, add_special_tokens=not template.apply_chat_template, padding=True,
                            return_tensors="pt").to(model.device)
            with torch.no_grad():
                seqs = model.generate(**enc, **gen_args)
            texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            texts = [t.strip() for t in texts]
            out += [texts[i:i + num_alternates] for i in range(0, len(texts), num_alternates)]
            log.info("generated %d / %d", min(start + batch_size, len(prompts)), len(prompts))
    finally:
        tokenizer.padding_side = old_side
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", required=True, help="a configs/model/<name>.yaml name, e.g. SmolLM2-135M-Instruct")
    parser.add_argument("--model-path", default=None, help="model folder (e.g. the fine-tuned target); default: the config's")
    parser.add_argument("--input", type=Path, required=True, help="TOFU-format forget file, e.g. <tofu>/forget10.json")
    parser.add_argument("--output", type=Path, default=None, help="default: <input folder>/<input stem>_alternate.json")
    parser.add_argument("--num-alternates", type=int, default=1, help="alternates per question (>1 needs --sample)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question-key", default="question")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--alternate-key", default="alternate_answer")
    args = parser.parse_args(argv)
    if args.num_alternates < 1:
        parser.error(f"--num-alternates must be >= 1, got {args.num_alternates}")
    if args.num_alternates > 1 and not args.sample:
        parser.error(f"--num-alternates {args.num_alternates} with greedy decoding gives the same answer "
                     f"{args.num_alternates} times; add --sample")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens and --batch-size must be >= 1")
    if not args.input.is_file():
        parser.error(f"--input {args.input} is not a file")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from transformers import set_seed

    from data.utils import PromptTemplate
    from model import get_model

    rows = read_rows(args.input)
    for key in (args.question_key, args.answer_key):
        if key not in rows[0]:
            raise KeyError(f"column {key!r} not in {args.input}; columns: {sorted(rows[0])}")
    output = args.output or args.input.with_name(f"{args.input.stem}_alternate.json")
    model_cfg = load_model_config(args.model_config, args.model_path)
    set_seed(args.seed)
    model, tokenizer = get_model(model_cfg)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    template = PromptTemplate.from_config(dict(model_cfg.get("template_args") or {}))
    answers = generate(model, tokenizer, template, rows, args.question_key, args.answer_key, args.num_alternates,
                       args.max_new_tokens, args.batch_size, args.sample, args.temperature, args.top_p)
    n_empty = sum(not a for group in answers for a in group)
    if n_empty:
        log.warning("%d of %d generated alternates are empty", n_empty, len(rows) * args.num_alternates)
    out_rows = [{**row, args.alternate_key: group if args.num_alternates > 1 else group[0]}
                for row, group in zip(rows, answers)]
    write_rows_atomically(out_rows, output)
    log.info("wrote %d rows with %r to %s", len(out_rows), args.alternate_key, output)
    return output


if __name__ == "__main__":
    main()
