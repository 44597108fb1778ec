"""Online bits/byte of soma on the corpus files, beside standard compressors.

For every corpus file (or the ``--files`` subset), on the same bytes (the whole file, or its
first ``--max-bytes`` bytes), this measures:

- gzip -9 (``gzip`` module, mtime 0), bzip2 -9 (``bz2``), xz -9e (``lzma``, preset
  9 | PRESET_EXTREME), zstd -19 (``zstandard``) and PPMd order 6, variant I, 16 MiB
  (``pyppmd``): bits/byte = 8 * compressed length / length, each output checked to
  decompress back to the input;
- soma, for each ``--presets`` x ``--modes`` pair, from a fresh learner per file: the mean
  over the bytes of the loss (bits) of each byte, computed *before* the model learned from it
  (``SomaLearner.learn``). This is the ideal code length an arithmetic coder driven by the
  model would approach (within a few bytes per file); no coder is run here.

Modes: ``d0`` learns from every byte (fixed d = 0); ``adaptive`` is the default
surprise-adaptive metabolism, which observes (learns from) only a share of the bytes.

    PYTHONPATH=. python -m bench.bpb --max-bytes 20000            # quick look
    PYTHONPATH=. python -m bench.bpb --json bench/out/bpb.json    # whole files (slow: hours)

Learning is slow (small/d0: a few KB/s per core), so whole-file runs of every corpus take long;
``--max-bytes`` makes a short run, and the tables always say which bytes were measured.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import time

import pyppmd
import zstandard

from .common import (
    MODES,
    Progress,
    corpus_files,
    data_dir,
    fmt_bytes,
    fmt_duration,
    fmt_rate,
    log,
    machine_info,
    make_learner,
    set_threads,
    split_list,
    table,
    write_json,
)

# name -> (compress, decompress)
COMPRESSORS = {
    "gzip-9": (lambda b: gzip.compress(b, compresslevel=9, mtime=0), gzip.decompress),
    "bzip2-9": (lambda b: bz2.compress(b, 9), bz2.decompress),
    "xz-9e": (lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "zstd-19": (
        lambda b: zstandard.ZstdCompressor(level=19).compress(b),
        lambda c: zstandard.ZstdDecompressor().decompress(c),
    ),
    "ppmd6": (
        lambda b: pyppmd.compress(b, max_order=6, mem_size=16 << 20, variant="I"),
        lambda c: pyppmd.decompress(c, max_order=6, mem_size=16 << 20, variant="I"),
    ),
}


# pyppmd.decompress (variant I, no end mark) fails to reproduce some inputs although the
# encoder is fine; its size is still reported, marked with '*' in the table.
UNRELIABLE_DECODERS = {"ppmd6"}


def measure_compressor(name: str, data: bytes) -> dict:
    compress, decompress = COMPRESSORS[name]
    t0 = time.perf_counter()
    packed = compress(data)
    seconds = time.perf_counter() - t0
    try:
        roundtrip = bytes(decompress(packed)) == data
    except Exception:  # pyppmd's one-shot decoder can fail on some inputs (no end mark)
        roundtrip = False
    if not roundtrip and name not in UNRELIABLE_DECODERS:
        raise RuntimeError(f"{name} did not round-trip")
    return {
        "roundtrip": roundtrip,
        "compressed_bytes": len(packed),
        "bpb": 8.0 * len(packed) / len(data) if data else 0.0,
        "seconds": seconds,
        "bytes_per_s": len(data) / seconds if seconds > 0 else None,
    }


def measure_soma(preset_name: str, mode: str, data: bytes, piece: int, label: str) -> dict:
    learner = make_learner(preset_name, mode)
    progress = Progress(label, len(data))
    total_bits, elapsed = 0.0, 0.0
    for start in range(0, len(data), piece):
        chunk = data[start : start + piece]
        t0 = time.perf_counter()
        bits = learner.learn(chunk)
        elapsed += time.perf_counter() - t0
        total_bits += float(bits.double().sum())
        done = start + len(chunk)
        m = learner.metabolism
        progress.update(done, f"{total_bits / done:.3f} bpb, d={m.d:.2f}, obs/byte={m.observations / max(1, m.bytes):.3f}")
    m = learner.metabolism
    return {
        "bpb": total_bits / len(data) if data else 0.0,
        "seconds": elapsed,
        "bytes_per_s": len(data) / elapsed if elapsed > 0 else None,
        "observations": m.observations,
        "obs_per_byte": m.observations / max(1, m.bytes),
        "updates": learner.updates,
        "final_d": m.d,
    }


def soma_columns(presets: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    return [(p, m, f"{p}/{m}") for p in presets for m in modes]


def summary_row(results: list[dict], compressors: list[str], columns: list[str], weighted: bool) -> dict:
    """Mean bits/byte over files: plain mean of the per-file figures, or bytes-weighted."""
    out = {}
    for kind, names in (("compressors", compressors), ("soma", columns)):
        for name in names:
            vals = [(r["bytes_used"], r[kind][name]["bpb"]) for r in results if name in r[kind]]
            if not vals:
                continue
            if weighted:
                n = sum(b for b, _ in vals)
                out[name] = sum(b * v for b, v in vals) / n if n else 0.0
            else:
                out[name] = sum(v for _, v in vals) / len(vals)
    return out


def render(results: list[dict], compressors: list[str], columns: list[str], max_bytes: int | None) -> str:
    scope = f"first {max_bytes:,} bytes of each file" if max_bytes else "whole files"
    cols = compressors + columns
    headers = ["file", "bytes", *cols]
    rows = [[r["file"], f"{r['bytes_used']:,}", *(fmt_cell(r, c, compressors) for c in cols)] for r in results]
    if len(results) > 1:
        mean = summary_row(results, compressors, columns, weighted=False)
        wmean = summary_row(results, compressors, columns, weighted=True)
        total = sum(r["bytes_used"] for r in results)
        rows.append(["mean (per file)", "", *(f"{mean[c]:.3f}" if c in mean else "-" for c in cols)])
        rows.append(["all (bytes-weighted)", f"{total:,}", *(f"{wmean[c]:.3f}" if c in wmean else "-" for c in cols)])
    out = [
        f"## Bits/byte ({scope}; lower is better)",
        "",
        table(headers, rows),
    ]
    if columns:
        out += [
            "",
            "soma columns are preset/mode: online loss, each byte scored before it is learned, fresh learner per file",
            "(ideal code length; no arithmetic coder is run). '*': compressed size, but pyppmd's decoder did not reproduce the input. d0 learns from every byte; adaptive is the default",
            "surprise-adaptive metabolism.",
        ]
        srows = []
        for r in results:
            row = [r["file"]]
            for c in columns:
                s = r["soma"].get(c)
                row += [fmt_rate(s["bytes_per_s"]) if s and s["bytes_per_s"] else "-", f"{s['obs_per_byte']:.3f}" if s else "-"]
            srows.append(row)
        sheaders = ["file"]
        for c in columns:
            sheaders += [f"{c} speed", f"{c} obs/B"]
        out += [
            "",
            f"## soma learning speed ({scope}; torch threads: {results[0]['threads'] if results else '?'}; 1 KB = 1000 bytes)",
            "",
            table(sheaders, srows),
            "",
            "obs/B: observations (bytes the model learned from) per byte scored.",
        ]
    crow = [[name, *(f"{(r['compressors'][name]['bytes_per_s'] or 0) / 1e6:.2f}" for r in results)] for name in compressors]
    if crow:
        out += ["", f"## Compressor speed, MB/s (compression only, one thread, {scope}; noisy on short inputs)", "", table(["compressor", *(r["file"] for r in results)], crow)]
    return "\n".join(out)


def fmt_cell(result: dict, col: str, compressors: list[str]) -> str:
    entry = result["compressors" if col in compressors else "soma"].get(col)
    if not entry:
        return "-"
    return f"{entry['bpb']:.3f}" + ("" if entry.get("roundtrip", True) else "*")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bpb", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="corpus directory (default: $SOMAD_DATA or ../shared/data/corpora next to the repo)")
    ap.add_argument("--files", help="comma-separated subset of corpus file names (default: all but MANIFEST)")
    ap.add_argument("--max-bytes", type=int, default=0, help="use only the first N bytes of each file (default 0: whole file)")
    ap.add_argument("--presets", default="tiny,small", help="comma-separated soma presets (tiny,small,base; seed only if named; '' for none)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated learning modes from {list(MODES)}")
    ap.add_argument("--compressors", default=",".join(COMPRESSORS), help=f"comma-separated subset of {list(COMPRESSORS)} ('' for none)")
    ap.add_argument("--piece", type=int, default=1 << 16, help="bytes fed to learn() per call (default 65536)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, like the compressors; 0 = torch default)")
    ap.add_argument("--json", metavar="OUT", help="write results as JSON (rewritten after every file)")
    args = ap.parse_args(argv)

    presets = split_list(args.presets)
    modes = split_list(args.modes) if presets else []
    compressors = split_list(args.compressors)
    for name in compressors:
        if name not in COMPRESSORS:
            ap.error(f"unknown compressor {name!r}; choose from {list(COMPRESSORS)}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {list(MODES)}")
    if args.max_bytes < 0 or args.piece <= 0:
        ap.error("--max-bytes must be >= 0 and --piece > 0")
    if "seed" in presets:
        log("warning: the seed preset is huge (~100 M parameters); expect a very slow run")
    threads = set_threads(args.threads)

    directory = data_dir(args.data)
    files = corpus_files(directory, split_list(args.files))
    columns = soma_columns(presets, modes)
    col_names = [c for _, _, c in columns]

    meta = {
        **machine_info(),
        "data_dir": str(directory),
        "max_bytes": args.max_bytes or None,
        "scope": f"first {args.max_bytes} bytes of each file" if args.max_bytes else "whole files",
        "presets": presets,
        "modes": modes,
        "compressors": compressors,
        "piece": args.piece,
    }
    results: list[dict] = []
    t_start = time.perf_counter()
    for path in files:
        raw = path.read_bytes()
        data = raw[: args.max_bytes] if args.max_bytes else raw
        log(f"{path.name}: {fmt_bytes(len(data))} of {fmt_bytes(len(raw))}")
        entry = {"file": path.name, "bytes_used": len(data), "bytes_total": len(raw), "threads": threads, "compressors": {}, "soma": {}}
        for name in compressors:
            entry["compressors"][name] = r = measure_compressor(name, data)
            log(f"  {name}: {r['bpb']:.3f} bpb ({r['seconds']:.2f}s)")
        for p, m, col in columns:
            entry["soma"][col] = r = measure_soma(p, m, data, args.piece, f"{path.name} {col}")
            log(f"  {col}: {r['bpb']:.3f} bpb, {fmt_rate(r['bytes_per_s'] or 0)}, obs/byte {r['obs_per_byte']:.3f}, final d {r['final_d']:.2f}")
        results.append(entry)
        if args.json:
            write_json(args.json, {"meta": meta, "files": results, "complete": False})
    log(f"done in {fmt_duration(time.perf_counter() - t_start)}")

    print(render(results, compressors, col_names, args.max_bytes or None))
    if args.json:
        summary = {
            "mean_per_file": summary_row(results, compressors, col_names, weighted=False),
            "bytes_weighted": summary_row(results, compressors, col_names, weighted=True),
        }
        write_json(args.json, {"meta": meta, "files": results, "summary": summary, "complete": True})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
