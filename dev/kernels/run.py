"""Check and time every op of dev/kernels in one go.

    python dev/kernels/run.py [op ...] [--check-only] [--small] [--markdown FILE] [--json FILE]

For each op module (all of them when none is named) it runs `check` - at small sizes on the CPU, where the kernels run
under Triton's interpreter, or when --small is given - and then, on a GPU and unless --check-only, `benchmark`, and
prints one table per op (a module may time several ops, e.g. layernorm_forward and layernorm_backward). At the end a
summary table: per op, the mainline's version, its time and throughput, its % of the bound, and the fastest of our
versions. The summary goes to FILE as markdown / JSON when asked; when $OUT is set both are written under it by
default. A failing check is reported and the rest still runs; the exit status is then nonzero.
"""

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

# The op modules and common are imported by plain name from dev/kernels; llmpy from the repository root.
_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parents[1], _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from common import Result, bound_of, copy_bandwidth_gbps, format_table, percent_of_bound, print_table  # noqa: E402

OPS = ["encoder", "layernorm", "rmsnorm", "matmul", "bias", "attention", "rope", "gelu", "swiglu", "softmax",
       "classifier", "adamw", "global_norm", "fp8_cast"]


def load(op: str):
    return importlib.import_module(op)


def summarize(results: list[Result]) -> list[dict]:
    """One row per op name: the mainline's version against the bound, and our fastest version."""
    by_op: dict[str, list[Result]] = {}
    for r in results:
        by_op.setdefault(r.op, []).append(r)
    rows = []
    for op, rs in by_op.items():
        ours = [r for r in rs if not r.bound]
        main = next((r for r in ours if r.mainline), None)
        best = min(ours, key=lambda r: r.ms) if ours else None
        bound = bound_of(rs)
        rows.append({
            "op": op,
            "mainline": main.version if main else None,
            "ms": main.ms if main else None,
            "throughput": main.throughput() if main else None,
            "gbps": main.gbps if main else None,
            "tflops": main.tflops if main else None,
            "pct_of_bound": percent_of_bound(main, rs) if main and bound else None,
            "bound": bound.version if bound else None,
            "bound_ms": bound.ms if bound else None,
            "best": best.version if best else None,
            "best_ms": best.ms if best else None,
        })
    return rows


def summary_cells(row: dict) -> list[str]:
    fmt = lambda x, f: "-" if x is None else format(x, f)
    return [row["op"], row["mainline"] or "-", fmt(row["ms"], ".3f"), row["throughput"] or "-",
            fmt(row["pct_of_bound"], ".0f") + ("%" if row["pct_of_bound"] is not None else ""),
            row["bound"] or "-", row["best"] or "-"]


SUMMARY_HEADERS = ["op", "mainline", "ms", "throughput", "% of bound", "bound", "best version"]


def environment() -> dict:
    import triton

    on_gpu = torch.cuda.is_available()
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": round(copy_bandwidth_gbps()) if on_gpu else None,  # what the memory-bound ops compare with
    }


def markdown(env: dict, rows: list[dict], tables: dict[str, list[Result]], failures: list[str]) -> str:
    head = f"{env['date']}, {env['device']}, torch {env['torch']}, triton {env['triton']}"
    if env["copy_gbps"]:
        head += f", device-to-device copy {env['copy_gbps']} GB/s"
    lines = [f"Summary ({head}):", "", "| " + " | ".join(SUMMARY_HEADERS) + " |",
             "|" + "---|" * len(SUMMARY_HEADERS)]
    lines += ["| " + " | ".join(summary_cells(r)) + " |" for r in rows]
    if not rows:
        lines.append("(no benchmarks: they run on a GPU)")
    for op, rs in tables.items():
        lines += ["", f"{op}:", "", "| version | ms | throughput | % of bound |", "|---|---|---|---|"]
        for r in rs:
            pct = percent_of_bound(r, rs)
            name = r.version + (" *" if r.mainline else "") + (" (bound)" if r.bound else "")
            lines.append(f"| {name} | {r.ms:.3f} | {r.throughput()} | {'-' if pct is None else f'{pct:.0f}%'} |")
    if failures:
        lines += ["", "Failed: " + ", ".join(failures)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", help=f"op modules to run (default: all of {', '.join(OPS)})")
    parser.add_argument("--check-only", action="store_true", help="run the checks, skip the benchmarks")
    parser.add_argument("--small", action="store_true", help="check at the small sizes even on a GPU")
    parser.add_argument("--markdown", metavar="FILE", help="write the summary and per-op tables as markdown")
    parser.add_argument("--json", metavar="FILE", help="write every result and the summary as JSON")
    args = parser.parse_args(argv)

    unknown = [op for op in args.ops if op not in OPS]
    if unknown:
        print(f"run.py: unknown op {', '.join(unknown)} (known: {', '.join(OPS)})", file=sys.stderr)
        return 2
    ops = args.ops or OPS
    on_gpu = torch.cuda.is_available()
    small = args.small or not on_gpu
    out_dir = os.environ.get("OUT")
    markdown_file = args.markdown or (os.path.join(out_dir, "kernels.md") if out_dir else None)
    json_file = args.json or (os.path.join(out_dir, "kernels.json") if out_dir else None)

    env = environment()
    copy = f", copy {env['copy_gbps']} GB/s" if env["copy_gbps"] else ""
    print(f"{env['device']}{copy}, torch {env['torch']}, triton {env['triton']}; checks at "
          f"{'small' if small else 'd12'} sizes{'' if on_gpu and not args.check_only else ', no benchmarks'}")
    failures: list[str] = []
    results: list[Result] = []
    for op in ops:
        t0 = time.perf_counter()
        try:
            module = load(op)
            lines = module.check(small=small)
        except Exception as e:  # a failing op is reported, the others still run
            failures.append(f"{op} check")
            print(f"\n{op}: CHECK FAILED: {type(e).__name__}: {e}")
            if not isinstance(e, AssertionError):
                traceback.print_exc()
            continue
        print(f"\n{op}: check passed ({time.perf_counter() - t0:.1f} s)")
        for line in lines:
            print(f"  {line}")
        if on_gpu and not args.check_only:
            try:
                op_results = module.benchmark()
            except Exception as e:
                failures.append(f"{op} benchmark")
                print(f"{op}: BENCHMARK FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            results += op_results
            for name in dict.fromkeys(r.op for r in op_results):
                print_table(name, [r for r in op_results if r.op == name])
            torch.cuda.empty_cache()

    rows = summarize(results)
    tables: dict[str, list[Result]] = {}
    for r in results:
        tables.setdefault(r.op, []).append(r)
    if rows:
        print("\nSummary (* mainline; % of bound = bound ms / mainline ms)")
        print(format_table(SUMMARY_HEADERS, [summary_cells(r) for r in rows]))
    if failures:
        print("\nFAILED: " + ", ".join(failures))
    if markdown_file:
        Path(markdown_file).write_text(markdown(env, rows, tables, failures))
    if json_file:
        payload = {"environment": env, "summary": rows, "failures": failures,
                   "results": [dict(vars(r), gbps=r.gbps, tflops=r.tflops) for r in results]}
        Path(json_file).write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
