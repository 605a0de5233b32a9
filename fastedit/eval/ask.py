"""``fastedit ask``: a model's greedy continuation of a few prompts, edited or not.

    fastedit ask --model edited/ --base testbed "Zanthon Thilmu plays the"

With ``--base`` the unedited model answers too, on the line below, so an edit shows directly.
"""
from __future__ import annotations

from fastedit.errors import InputError
from fastedit.loading import add_threads_argument, check_model, load_model, set_threads


def configure(parser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue (quote each prompt)")
    parser.add_argument("--model", required=True,
                        help="local model directory (e.g. what `fastedit edit --out` wrote), hub name, or "
                             "'testbed' / 'testbed:gpt2'")
    parser.add_argument("--base", default=None, help="a second model to answer too (e.g. the unedited one)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    add_threads_argument(parser)


def run(args) -> int:
    from fastedit.eval.scoring import greedy_generate

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if any(not p.strip() for p in args.prompts):
        raise InputError("a PROMPT is empty; quote each prompt, e.g. \"Zanthon Thilmu plays the\"")
    names = [args.model] + ([args.base] if args.base is not None else [])
    for name in names:
        check_model(name)
    set_threads(args.threads, args.device)
    answers = {}
    for name in names:
        model, tok = load_model(name, device=args.device, dtype=args.dtype)
        texts = greedy_generate(model, tok, args.prompts, max_new_tokens=args.max_new_tokens)
        # greedy_generate returns prompt + continuation; show the continuation after the prompt
        answers[name] = [t[len(p):] if t.startswith(p) else t for p, t in zip(args.prompts, texts)]
    width = max(len(n) for n in names)
    for i, prompt in enumerate(args.prompts):
        print(prompt)
        for name in names:
            print(f"  {name:<{width}}  ...{answers[name][i]}")
    return 0
