"""The ``extract`` command: run a backbone over a data set once and write a feature store.

    extract --model resnet10 --checkpoint ckpt.pt --dataset omniglot --data-root DATA --out omniglot.zarr
    extract list
"""

from __future__ import annotations

import click

from featstore.cli_support import main_entry
from featstore.errors import UserError


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", help="Backbone name (see `extract list`).")
@click.option("--out", type=click.Path(), help="Store to write (a new folder), or an unfinished one to resume.")
@click.option("--dataset", default="digits", show_default=True, help="Data source (see `extract list`).")
@click.option("--data-root", type=click.Path(), default=None, help="Folder of the data set on disk.")
@click.option("--split", default=None, help="Subset of the data source (e.g. train, test, background).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Backbone weights (ours or a plain state dict).")
@click.option("--random-init", is_flag=True, help="Allow random weights (a debugging aid, never a default).")
@click.option("--image-size", type=int, default=None, help="Input side in px (default: the model's, at its "
              "small-image size for data of 64 px or less; image folders and csv / imagenet-lowshot lists are "
              "sized by a probe of their files).")
@click.option("--small-input/--imagenet-stem", default=None,
              help="Stem for 28-32 px inputs (default: chosen from the input size).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=1, show_default=True, help="DataLoader worker processes.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--chunk-rows", type=int, default=4096, show_default=True, help="Rows per Zarr chunk.")
@click.option("--compression", type=click.Choice(["none", "lz4", "zstd"]), default="none", show_default=True)
@click.option("--shard-rows", type=int, default=None, help="Zarr v3 shards of this many rows (only for very large "
              "stores: shards read 2-5x slower than plain chunks).")
@click.option("--maps", "maps_layer", default=None, metavar="LAYER", help="Also store the spatial maps of LAYER.")
@click.option("--views", type=int, default=0, show_default=True, help="Extra augmented views per sample.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random weights (--random-init) and of the augmented --views.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch, BLAS and FAISS [default: leave the thread pools as they are].")
@click.option("--limit", type=int, default=None, help="Only the first N samples (quick looks).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Channels-last memory layout (faster on CPU); --no-channels-last keeps NCHW.")
@click.option("--follow-links", is_flag=True, help="imagefolder: also read linked files and folders outside "
              "--data-root (links inside it are always read; loops and doubly reached files are refused).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.pass_context
def cli(ctx: click.Context, model, out, dataset, data_root, split, checkpoint, random_init, image_size, small_input,
        batch_size, workers, dtype, chunk_rows, compression, shard_rows, maps_layer, views, device, seed, threads,
        limit, channels_last, follow_links, quiet):
    """Extract features of a data set through a backbone into a Zarr feature store (resumable)."""
    if ctx.invoked_subcommand is not None:
        return
    if not model or not out:
        raise click.UsageError("extract needs --model and --out (or a subcommand: extract list)")
    from extract.run import ExtractConfig, dist_info, run_extraction

    source_options = {}
    if follow_links:
        if dataset.strip().lower() != "imagefolder":
            raise UserError("--follow-links applies only to --dataset imagefolder")
        source_options["follow_links"] = True
    cfg = ExtractConfig(model=model, out=out, dataset=dataset, data_root=data_root, split=split,
                        checkpoint=checkpoint, random_init=random_init, image_size=image_size,
                        small_input=small_input, batch_size=batch_size, workers=workers, dtype=dtype,
                        chunk_rows=chunk_rows, compression=compression, shard_rows=shard_rows, maps=maps_layer,
                        views=views, device=device, seed=seed, channels_last=channels_last, threads=threads,
                        quiet=quiet, limit=limit, source_options=source_options)
    result = run_extraction(cfg)
    if not quiet and dist_info()[0] == 0:
        if result.rows_computed:
            click.echo(f"{result.path}: {result.rows_computed} rows in {result.chunks_computed} chunks, "
                       f"{result.seconds:.1f} s ({result.images_per_second:.0f} img/s); "
                       f"complete: {'yes' if result.complete else 'no'}")
        else:
            click.echo(f"{result.path}: nothing to do (complete: {'yes' if result.complete else 'no'})")


@cli.command("list")
def list_cmd():
    """List the registered backbones and data sources."""
    from extract.backbones import list_backbones
    from extract.datasets import list_sources

    click.echo("backbones: " + ", ".join(list_backbones()))
    click.echo("data sources: " + ", ".join(list_sources()))


def _add_train_command() -> None:
    from extract.train import train_command

    cli.add_command(train_command)


_add_train_command()

main = main_entry(cli, "extract")

if __name__ == "__main__":
    main()
