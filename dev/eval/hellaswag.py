"""HellaSwag accuracy of an llm.c model file, scored as train_gpt2.py -h 1 and llm.c score it (llmpy/evals.py).

On the CPU the forward is the NumPy trainer's (train_gpt2_cpu.py, fp32); with --device cuda the mainline's
(llmpy/models/gpt2.py, in --dtype). Prints `HellaSwag: correct/examples = accuracy`, and with --verbose each example's
mean completion losses. The accuracy does not depend on -b or -t (causal attention: padding after an example
changes nothing), only on the weights and the precision.

    python dev/data/hellaswag.py                                       # the eval file, once
    python dev/eval/hellaswag.py -e gpt2_124M.bin                      # NumPy, on the CPU
    python dev/eval/hellaswag.py -e gpt2_124M.bin --device cuda -b 64  # the mainline, on a GPU
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for llmpy and train_gpt2_cpu

from llmpy import evals, formats, hf  # noqa: E402
from llmpy.progress import progress  # noqa: E402
from llmpy.signals import run_quietly  # noqa: E402

def numpy_token_losses(config, params):
    """The NumPy trainer's forward: (inputs, targets) -> its per-token losses (B*T,) fp32."""
    import train_gpt2_cpu  # numpy only

    model = train_gpt2_cpu.GPT2(config, params)

    def token_losses(inputs, targets):
        model.forward(inputs, targets)
        return model.acts.losses

    return token_losses


def mainline_token_losses(config, params, B, T, device, dtype):
    """The mainline's forward on the GPU: (inputs, targets) -> its per-token losses (B*T,) fp32. torch is imported
    here, so that the NumPy path runs without it."""
    import torch

    from llmpy.models import gpt2

    if not device.startswith("cuda"):
        raise ValueError(f"--device {device}: use cpu (NumPy) or cuda, cuda:N (the mainline)")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available (--device cpu scores with NumPy)")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device, use cuda or cuda:N") from None
    if device.index is not None:
        torch.cuda.set_device(device)
    # our Triton attention, so that no cuDNN frontend is needed (the trainer's bf16 default is cuDNN's)
    model = gpt2.build(config, B, T, dtype=getattr(torch, dtype), device=device, attention_impl="triton")
    model.runtime.load_weights(params)

    def token_losses(inputs, targets):
        model.forward(torch.from_numpy(inputs), torch.from_numpy(targets), train=False)
        return model.acts.losses.cpu().numpy()

    return token_losses


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--model", required=True, help="an llm.c model file (fp32 or bf16), or a Hugging Face GPT-2 "
                   "(gpt2 ... gpt2-xl, or a folder)")
    p.add_argument("-i", "--input", default="dev/data/hellaswag/hellaswag_val.bin",
                   help="the llm.c eval file (python dev/data/hellaswag.py writes it)")
    p.add_argument("-b", "--batch_size", type=int, default=16, help="rows a forward, a multiple of 4 (4 an example)")
    p.add_argument("-t", "--sequence_length", type=int, default=None,
                   help="T of a forward; default: the shortest that fits every example")
    p.add_argument("--device", default="cpu", help="cpu (NumPy), or cuda / cuda:N (the mainline)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="the mainline's parameters and activations (--device cuda; the NumPy forward is fp32)")
    p.add_argument("--verbose", action="store_true",
                   help="print each example: its index, label, prediction and the 4 completions' mean losses")
    return p.parse_args(argv)


def evaluate(args):
    config, params = hf.load_weights(args.model)
    examples = evals.read_examples(args.input, config.vocab_size)
    B = args.batch_size
    if B <= 0 or B % evals.COMPLETIONS:
        raise ValueError(f"-b/--batch_size {B} is not a positive multiple of {evals.COMPLETIONS}: an example's "
                         f"{evals.COMPLETIONS} completions take {evals.COMPLETIONS} rows of a forward")
    T = args.sequence_length or max(evals.length_needed(ex) for ex in examples)
    if T > config.max_seq_len:
        raise ValueError(f"-t {T}: longer than the model's max_seq_len {config.max_seq_len}")
    try:
        loader = evals.EvalLoader(examples, B, T)
    except ValueError as e:  # an example longer than -t
        raise ValueError(f"{args.input}: {e}") from None
    if args.device == "cpu":
        token_losses = numpy_token_losses(config, params)
    else:
        token_losses = mainline_token_losses(config, params, B, T, args.device, args.dtype)
    with progress(total=len(examples), desc="HellaSwag", unit=" examples") as bar:
        scores = evals.evaluate(loader, token_losses, on_batch=bar.update)
    if args.verbose:
        for index, label, prediction, losses in zip(scores.indices, scores.labels, scores.predictions,
                                                    scores.mean_losses):
            print(f"example {index} label {label} predicted {prediction} losses "
                  + " ".join(f"{loss:.6f}" for loss in losses))
    print(f"HellaSwag: {scores.correct}/{len(examples)} = {scores.correct / len(examples):f}")


def main(argv=None):
    args = parse_args(argv)
    run_quietly(lambda: evaluate(args), (formats.FormatError, ValueError, OSError))


if __name__ == "__main__":
    main()
