"""The official Ovis-U1-3B checkpoint from the command line: download it, check it, make tiny ones, list names.

    python weights.py download                        # AIDC-AI/Ovis-U1-3B into the Hugging Face cache
    python weights.py download --dir ckpt/ovis-u1     # ... or into a directory
    python weights.py check ckpt/ovis-u1              # files, names, shapes and sizes against the model
    python weights.py tiny /tmp/tiny-ovis             # a tiny random checkpoint in the official layout
    python weights.py manifest --compare tests/golden/full_manifest.json
    python weights.py golden --weights ckpt/ovis-u1 --out golden-full --dtype bfloat16 --device cuda
"""
from ovis_min.cli import ctrl_c_quits_quietly, ctrl_c_raises

ctrl_c_quits_quietly("weights.py")  # covers the seconds the imports below take

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from ovis_min.checkpoint import (DEFAULT_REPO, HUB_IDS, CheckpointError, build_model,  # noqa: E402
                                 check_checkpoint, format_counts, match, read_config, table1_counts)
from ovis_min.hub import download_checkpoint, resolve_source  # noqa: E402
from ovis_min.config import OvisConfig  # noqa: E402
from ovis_min.files import disk_full  # noqa: E402
from ovis_min.tiny import write_tiny_checkpoint  # noqa: E402

ctrl_c_raises()


def cmd_download(args) -> int:
    target = download_checkpoint(args.repo_id, local_dir=args.dir, revision=args.revision, progress=not args.quiet)
    print(f"downloaded {args.repo_id}@{args.revision} to {target}")
    print(f"check it with: python weights.py check {target}")
    return 0


def cmd_check(args) -> int:
    for line in check_checkpoint(resolve_source(args.source, revision=args.revision)):
        print(line)
    print("OK: the checkpoint matches the model")
    return 0


def cmd_tiny(args) -> int:
    if args.shards < 1:
        raise CheckpointError(f"--shards {args.shards}: must be at least 1")
    if not 0 <= args.seed < 2 ** 63:
        raise CheckpointError(f"--seed {args.seed}: must be between 0 and 2**63 - 1")
    directory = write_tiny_checkpoint(args.dir, seed=args.seed, shards=args.shards, slow_tokenizer=args.slow_tokenizer,
                                      force=args.force)
    files = sorted(path.name for path in Path(directory).iterdir())
    print(f"wrote a tiny random checkpoint (seed {args.seed}) to {directory}: {', '.join(files)}")
    return 0


def cmd_manifest(args) -> int:
    config = read_config(args.config) if args.config else OvisConfig()
    model = build_model(config)
    entries = [{"key": name, "shape": list(tensor.shape), "numel": tensor.numel()}
               for name, tensor in model.state_dict(keep_vars=True).items()]
    counts = table1_counts(model)
    if args.compare:
        try:
            reference = json.loads(Path(args.compare).read_text())["keys"]
            shapes = {entry["key"]: tuple(entry["shape"]) for entry in reference}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{args.compare}: not a manifest (a JSON object whose 'keys' is a list of "
                                  f"{{'key', 'shape'}}): {error}") from None
        mismatch, _ = match(model, shapes)
        if mismatch:
            print(f"FAILED: the model differs from {args.compare}: {mismatch.describe()}", file=sys.stderr)
            return 1
        print(f"OK: all {len(shapes)} names and shapes of {args.compare} match the model, nothing left over")
    elif args.json:
        print(json.dumps({"num_keys": len(entries), "param_counts": counts, "keys": entries}, indent=1))
        return 0
    else:
        width = max(len(entry["key"]) for entry in entries)
        for entry in entries:
            print(f"{entry['key']:<{width}}  {' x '.join(map(str, entry['shape']))}")
    print(f"{len(entries)} names; parameters (tied counted once): {format_counts(counts)}")
    return 0


def cmd_golden(args) -> int:
    import torch  # only this command computes
    from ovis_min.golden import export_golden
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"--device {args.device}: torch sees no CUDA GPU; use --device cpu")
    directory = resolve_source(args.weights, revision=args.revision, download=True)
    try:
        names = export_golden(directory, args.out, dtype=getattr(torch, args.dtype), device=args.device,
                              height=args.height, width=args.width, steps=args.steps)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    print(f"wrote {len(names)} golden cases ({args.dtype} on {args.device}) to {args.out}: {', '.join(names)}")
    print(f"check ovis-min against them with: OVIS_GOLDEN_DIR={args.out} python -m pytest tests/test_golden.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    download = commands.add_parser(
        "download", help="fetch a checkpoint into a directory or the Hugging Face cache",
        description="Fetch config.json, preprocessor_config.json, the tokenizer (tokenizer.json or the slow files), "
                    "the safetensors index and exactly the shards it names (never the repository's Python files), "
                    "through huggingface_hub: the standard Hugging Face cache (HF_HOME, HF_HUB_CACHE), tokens from "
                    "`hf auth login` or HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, checksums, locks, retries and "
                    "resumed transfers. Run it again to finish an interrupted or incomplete download.")
    download.add_argument("repo_id", nargs="?", default=DEFAULT_REPO,
                          help=f"hub repository (default {DEFAULT_REPO}; also {', '.join(HUB_IDS[1:])})")
    download.add_argument("--dir", type=Path, help="write the files into this folder (huggingface_hub's local_dir) "
                                                   "instead of the Hugging Face cache")
    download.add_argument("--revision", default="main", help="branch, tag, commit or refs/pr/N (default main)")
    download.add_argument("--quiet", action="store_true", help="no progress bars")
    download.set_defaults(run=cmd_download)

    check = commands.add_parser(
        "check", help="verify a checkpoint: files present, names and shapes against the model, sizes",
        description="Verify a checkpoint without loading it: the required files are present, config.json and "
                    "preprocessor_config.json hold usable values, the tokenizer (tokenizer.json or the slow files) "
                    "opens, every shard is as long as its header says, and every "
                    "tensor name and shape matches the model (nothing missing, nothing left over). "
                    "Exit status 0 when it is usable, 1 with the problem named otherwise.")
    check.add_argument("source", help="checkpoint directory, or a hub id found in the Hugging Face cache")
    check.add_argument("--revision", default="main", help="revision to look up for a hub id (default main)")
    check.set_defaults(run=cmd_check)

    tiny = commands.add_parser(
        "tiny", help="write a tiny random checkpoint in exactly the official layout",
        description="Write a tiny random Ovis-U1 (under 1M parameters, float32) in the official layout: "
                    "config.json, model-0000i-of-0000n.safetensors + model.safetensors.index.json (or one "
                    "model.safetensors), a byte-level BPE tokenizer.json with the Qwen special tokens (or, with "
                    "--slow-tokenizer, vocab.json, merges.txt, added_tokens.json), tokenizer_config.json, "
                    "special_tokens_map.json and preprocessor_config.json. For smoke tests and for porting "
                    "ovis-min to other frameworks.")
    tiny.add_argument("dir", type=Path, help="output directory (created; an existing non-empty one needs --force)")
    tiny.add_argument("--slow-tokenizer", action="store_true",
                      help="write the slow tokenizer files instead of tokenizer.json")
    tiny.add_argument("--force", action="store_true", help="replace the contents of an existing directory")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    tiny.add_argument("--shards", type=int, default=2, help="number of safetensors shards; 1 writes a single "
                                                            "model.safetensors without index (default 2)")
    tiny.set_defaults(run=cmd_tiny)

    manifest = commands.add_parser(
        "manifest", help="print or compare the full-size key/shape manifest",
        description="Build the model on the meta device (no memory) and print every state-dict name with its "
                    "shape, then the parameter counts per row of the report's Table 1.")
    manifest.add_argument("--compare", metavar="FILE", help="compare with a manifest JSON ({'keys': [{'key', "
                                                           "'shape'}, ...]}); exit 1 on any difference")
    manifest.add_argument("--json", action="store_true", help="print the manifest as JSON in that format")
    manifest.add_argument("--config", type=Path, metavar="DIR",
                          help="build from DIR/config.json instead of the built-in full-size configuration")
    manifest.set_defaults(run=cmd_manifest)

    golden = commands.add_parser(
        "golden", help="write golden cases (inputs, outputs, intermediates) from a checkpoint, for ports",
        description="Run ovis-min on inputs made here (drawn images, the official scripts' prompts, the "
                    "checkpoint's preprocessing sizes) and write every case of tests/golden/ in its format, with "
                    "the weights, config and tokenizer they need and extra intermediates (adapter input, timestep "
                    "embedding, every decoder block, each Euler step, the VAE decoder's input). See "
                    "tests/golden/README.md. The official checkpoint in bfloat16 on a GPU gives the full-size "
                    "reference (about 8 GB of files: the weights are stored once in the export dtype).")
    golden.add_argument("--weights", required=True, metavar="DIR_OR_ID",
                        help="checkpoint directory, or a hub id (from the cache, downloaded if missing)")
    golden.add_argument("--out", required=True, type=Path, help="output directory (created; cases are replaced)")
    golden.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute (default float32)")
    golden.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    golden.add_argument("--height", type=int, default=256, help="generated image height, a multiple of 32 (256)")
    golden.add_argument("--width", type=int, default=256, help="generated image width, a multiple of 32 (256)")
    golden.add_argument("--steps", type=int, default=3, help="Euler steps of the sampler cases (default 3)")
    golden.add_argument("--revision", default="main", help="revision of a hub id (default main)")
    golden.set_defaults(run=cmd_golden)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CheckpointError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the file system refused: a read-only folder, a path through a file, a full disk
        what = getattr(args, "dir", None) or error.filename or ""
        fix = "free some space, or write elsewhere" if disk_full(error) else "choose a folder you can write"
        print(f"FAILED: cannot write {what} ({error.strerror or error}); {fix}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nFAILED: interrupted; files already complete are kept: run the same command again to finish",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
