"""The ``bench`` command: protocols, metrics and reports on feature stores.

Errors in the input stop with one line and exit code 2 (``--debug`` shows the traceback), through
:func:`featstore.cli_support.main_entry`.
"""

from __future__ import annotations

import os

import click

from featstore.cli_support import main_entry


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Benchmarks and evaluation protocols on feature stores."""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@cli.command()
@click.option("--sections", default="store,knn,extract,train,lowshot,fsor,fsor-meta", show_default=True,
              help="Comma-separated sections to run.")
@click.option("--rows", type=int, default=None,
              help="Rows: store section 200,000, knn base 100,000 by default (20,000 with --quick).")
@click.option("--dim", type=int, default=None, help="Feature dimension of the synthetic data [default: 512].")
@click.option("--queries", type=int, default=None,
              help="knn queries and gathered rows [default: 10,000; 2,000 with --quick].")
@click.option("--store", "store", type=click.Path(), default=None,
              help="A featstore store whose features replace the synthetic data (knn base = first rows, "
                   "queries = the next rows).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Folder for the temporary store and .npy of the store section [default: the system temp dir].")
@click.option("--compression", default="", show_default=False,
              help="Comma-separated codecs to compare beside the uncompressed store, e.g. lz4,zstd.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Small sizes for a smoke test; figures are not comparable with targets.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write results.json and perf.md into this folder.")
@click.option("--threads", type=int, default=os.cpu_count() or 1, show_default=True,
              help="Threads for numpy BLAS, torch and FAISS.")
@click.option("--lowshot-iterations", type=int, default=None,
              help="lowshot section: SGD iterations per run on both sides [default: 1,000; 100 with --quick].")
def perf(sections, rows, dim, queries, store, workdir, compression, seed, quick, out, threads,
         lowshot_iterations) -> None:
    """Speed figures, each a ratio against a reference measured in the same run.

    \b
    store      full scan and random gather of a store against a numpy memmap of the same bytes
    knn        FAISS flat / IVF / HNSW against the bare matrix product and scikit-learn brute force
    extract    `extract` throughput against the backbone's bare forward pass
    train      `extract train` throughput against a bare forward+backward+step loop
    lowshot    25 logreg runs in one process against one process per run re-reading HDF5
    fsor       3000 ProtoNet episodes vectorised against a per-episode loop
    fsor-meta  a TANE / DNPG meta-training epoch on cached features against one through the backbone
    """
    from bench.perf import PerfArgs, run_perf

    args = PerfArgs(sections=_csv(sections), rows=rows, dim=dim, queries=queries, store=store, workdir=workdir,
                    compression=_csv(compression), seed=seed, quick=quick, out=out, threads=threads,
                    lowshot_iterations=lowshot_iterations)
    run_perf(args, echo=click.echo)


def _add_protocol_commands() -> None:
    from bench.fsor import fsor_command
    from bench.fsor_finetune import fsor_finetune_command
    from bench.lowshot import lowshot_command
    from bench.pixel_floor import pixel_floor_command

    cli.add_command(fsor_command)
    cli.add_command(fsor_finetune_command)
    cli.add_command(lowshot_command)
    cli.add_command(pixel_floor_command)


_add_protocol_commands()

main = main_entry(cli, "bench")

if __name__ == "__main__":
    main()
