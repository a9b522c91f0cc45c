"""The ``featstore`` command: info, verify, index, search, split, export, import."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from featstore.cli_support import main_entry
from featstore.errors import CorruptStoreError, UserError
from featstore.store import FeatureStore

#: seconds a node writer (index, split) waits for another writer of the store before it refuses
NODE_LOCK_WAIT = 2.0


def _progress_enabled(ctx: click.Context, quiet: bool = False) -> bool:
    quiet = quiet or bool((ctx.find_root().obj or {}).get("quiet"))
    return not quiet and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Inspect, check, index, search and convert feature stores (--debug shows tracebacks)."""
    ctx.obj = {"quiet": quiet}


# ---------------------------------------------------------------------- info
def _pick(dicts: list[dict], *keys: str):
    for d in dicts:
        for key in keys:
            if isinstance(d, dict) and d.get(key) not in (None, "", {}):
                return d[key]
    return None


def _fmt(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _index_summaries(store: FeatureStore) -> dict:
    from featstore.index import index_attrs, stale_reason

    out = {}
    for name in store.index_names():
        attrs = index_attrs(store, name)
        built = attrs.get("built_from", {})
        reason = stale_reason(store, built)
        out[name] = {"kind": attrs.get("kind"), "metric": attrs.get("metric"), "normalized": attrs.get("normalized"),
                     "params": attrs.get("params", {}), "rows": built.get("rows"), "split": built.get("split"),
                     "created": built.get("created"), "stale": reason is not None, "stale_reason": reason}
    return out


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store: str, as_json: bool) -> None:
    """Summarise a store: size, chunks done, classes, splits, indexes, provenance."""
    st = FeatureStore.open(store)
    data = st.info()
    data["indexes"] = _index_summaries(st)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    fp, prov = st.fingerprint, st.provenance
    sources = [fp, prov]
    classes = st.classes
    shown_classes = ", ".join(classes[:8]) + (f", ... ({len(classes)} in all)" if len(classes) > 8 else "")
    lines = [
        ("store", data["path"]),
        ("format version", data["format_version"]),
        ("rows", data["rows"]),
        ("dim", data["dim"]),
        ("dtype", data["dtype"]),
        ("chunks done", f"{data['chunks_done']} ({'complete' if data['complete'] else 'incomplete'}; "
                        f"{data['chunk_rows']} rows per chunk, compression {data['compression']})"),
        ("classes", f"{len(classes)}: {shown_classes}" if classes else "0"),
        ("splits", ", ".join(f"{k} ({v} rows)" for k, v in data["splits"].items()) or "none"),
        ("checksums", "crc32c per chunk" if data["checksums"] else "none (written before featstore added them)"),
    ]
    if st.class_splits:
        lines.append(("class splits", ", ".join(f"{k} ({len(v)} classes)" for k, v in st.class_splits.items())))
    if data["maps"]:
        lines.append(("maps", "x".join(map(str, data["maps"]))))
    if data["views"]:
        lines.append(("views", data["views"]))
    if data["meta"]:
        lines.append(("meta", ", ".join(data["meta"])))
    idx = data["indexes"]
    lines.append(("indexes", "; ".join(
        f"{name} ({v['kind']}, {v['metric']}{', cosine' if v['normalized'] and v['metric'] == 'ip' else ''}, "
        f"{v['rows']} rows{', split ' + str(v['split']) if v['split'] else ''}"
        f"{', STALE: ' + v['stale_reason'] if v['stale'] else ''})" for name, v in idx.items()) or "none"))
    used = set()
    for label, keys in [("model", ("model", "backbone", "model_name")),
                        ("checkpoint sha256", ("checkpoint_sha256", "checkpoint", "weights_sha256")),
                        ("transform", ("transform", "transform_spec")),
                        ("data set", ("dataset", "data_set", "data", "source")),
                        ("data manifest", ("data_manifest", "manifest", "manifest_sha256", "source_sha256"))]:
        value = _pick(sources, *keys)
        used.update(keys)
        lines.append((label, _fmt(value) if value is not None else "-"))
    lines.append(("fingerprint hash", data["fingerprint_hash"]))
    for key in sorted(set(fp) - used):
        lines.append((f"fingerprint.{key}", _fmt(fp[key])))
    if prov.get("created"):
        lines.append(("created", prov["created"]))
    versions = prov.get("versions") or {}
    lines.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "-"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key + ':':<{width + 1}} {value}")


# ---------------------------------------------------------------------- verify
@cli.command()
@click.argument("store", type=click.Path())
@click.option("--no-values", is_flag=True, help="Skip the scan for non-finite feature values.")
def verify(store: str, no_values: bool) -> None:
    """Check a store: "ok" (exit 0) or one problem per line (exit 1).

    Lists what is damaged (metadata that does not parse, done chunks missing, truncated or failing their crc32c,
    unreadable splits, indexes and caches) rather than stopping at the first. A path that is not a store at all is
    a usage error (exit 2)."""
    try:
        st = FeatureStore.open(store, check_metadata=False)
    except CorruptStoreError as exc:
        click.echo(exc)
        sys.exit(1)
    problems = st.verify(check_values=not no_values)
    if not problems:
        try:
            checked = st.has_checksums
        except UserError:
            checked = False
        click.echo("ok" if checked else "ok (this store has no chunk checksums: it was written before featstore "
                                        "added them, so missing and truncated chunks are detected but changed "
                                        "bytes are not; re-create it to add them)")
        return
    for problem in problems:
        click.echo(problem)
    sys.exit(1)


# ---------------------------------------------------------------------- index
@cli.command()
@click.argument("store", type=click.Path())
@click.option("--kind", type=click.Choice(["flat", "ivf", "hnsw"]), default="flat", show_default=True,
              help="Exact (flat) or approximate (ivf, hnsw) search.")
@click.option("--metric", type=click.Choice(["ip", "l2"]), default="ip", show_default=True,
              help="ip: cosine similarity on normalised rows; l2: squared Euclidean distance.")
@click.option("--normalize/--no-normalize", default=None, help="L2-normalise rows [default: on for ip, off for l2].")
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="IVF lists [default: ~4 sqrt(n)].")
@click.option("--nprobe", type=click.IntRange(min=1), default=16, show_default=True, help="IVF lists searched.")
@click.option("--hnsw-m", type=click.IntRange(min=2), default=32, show_default=True, help="HNSW links per node.")
@click.option("--ef-search", type=click.IntRange(min=1), default=128, show_default=True, help="HNSW search depth.")
@click.option("--ef-construction", type=click.IntRange(min=1), default=200, show_default=True,
              help="HNSW build depth.")
@click.option("--name", default="default", show_default=True, help="Index name inside the store.")
@click.option("--split", default=None, help="Index only the rows of this split.")
@click.option("--done-only", is_flag=True, help="Index the done rows of an unfinished store.")
@click.option("--seed", type=int, default=0, show_default=True, help="IVF training seed.")
def index(store: str, kind: str, metric: str, normalize: bool | None, nlist: int | None, nprobe: int, hnsw_m: int,
          ef_search: int, ef_construction: int, name: str, split: str | None, done_only: bool, seed: int) -> None:
    """Build a FAISS index and save it inside the store."""
    import time

    from featstore.index import build_index, save_index

    st = FeatureStore.open(store)
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"bad index name {name!r}; use letters, digits, '-' or '_'")
    params: dict = {}
    if kind == "ivf":
        params = {"nlist": nlist, "nprobe": nprobe, "seed": seed}
    elif kind == "hnsw":
        params = {"hnsw_m": hnsw_m, "ef_search": ef_search, "ef_construction": ef_construction}
    t0 = time.perf_counter()
    built = build_index(st, kind=kind, metric=metric, normalize=normalize, split=split, done_only=done_only,
                        **params)
    save_index(st, built, name, wait=NODE_LOCK_WAIT)
    click.echo(f"index {name!r}: {kind}, {metric}{' (cosine)' if built.normalized and metric == 'ip' else ''}, "
               f"{built.ntotal} rows x {built.dim}, built in {time.perf_counter() - t0:.2f} s")


# ---------------------------------------------------------------------- search
@cli.command()
@click.argument("store", type=click.Path())
@click.option("--row", type=int, default=None, help="Query with the features of this store row.")
@click.option("--id", "sample_id", default=None, help="Query with the features of the sample with this id.")
@click.option("--queries", type=click.Path(), default=None, help="Query with the rows of a .npy file [q, d].")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("--index", "index_name", default="default", show_default=True,
              help="Index name (built and saved when missing or stale).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search(store: str, row: int | None, sample_id: str | None, queries: str | None, k: int, index_name: str,
           as_json: bool) -> None:
    """Nearest store rows of a row, an id or a .npy file of queries."""
    from featstore.index import get_index

    given = [x is not None for x in (row, sample_id, queries)]
    if sum(given) != 1:
        raise UserError("give exactly one of --row I, --id ID or --queries FILE.npy")
    st = FeatureStore.open(store)
    if row is not None:
        if not 0 <= row < st.n:
            raise UserError(f"--row {row} is outside 0..{st.n - 1}")
        q = st.gather(np.array([row]))
    elif sample_id is not None:
        hits = np.flatnonzero(st.ids == sample_id)
        if len(hits) == 0:
            raise UserError(f"no sample with id {sample_id!r} in store {st.path}")
        q = st.gather(hits[:1])
    else:
        path = Path(queries)
        if not path.is_file():
            raise UserError(f"no queries file at {path}")
        try:
            q = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot read {path} as a .npy array ({' '.join(str(exc).split())[:100]})") from None
        q = np.atleast_2d(q)
        if q.ndim != 2 or q.shape[1] != st.dim or not np.issubdtype(q.dtype, np.number):
            raise UserError(f"{path} must hold a numeric [q, {st.dim}] array, not {q.dtype} {q.shape}")
    fi = get_index(st, index_name)
    scores, rows = fi.search(q, k)
    labels, classes, ids = st.labels, st.classes, st.ids
    results = []
    for qi in range(len(q)):
        for rank in range(rows.shape[1]):
            r = int(rows[qi, rank])
            if r < 0:
                continue
            label = int(labels[r])
            results.append({"query": qi, "rank": rank + 1, "row": r, "id": str(ids[r]), "label": label,
                            "class": classes[label] if 0 <= label < len(classes) else None,
                            "score": float(scores[qi, rank])})
    if as_json:
        click.echo(json.dumps({"index": index_name, "kind": fi.kind, "metric": fi.metric,
                               "normalized": fi.normalized, "results": results}, indent=2))
        return
    multi = len(q) > 1
    header = ("query  " if multi else "") + f"{'rank':>4}  {'row':>8}  {'id':<24}  {'label':>5}  {'class':<16}  score"
    click.echo(header)
    for r in results:
        click.echo((f"{r['query']:>5}  " if multi else "") + f"{r['rank']:>4}  {r['row']:>8}  {r['id']:<24}  "
                   f"{r['label']:>5}  {str(r['class']):<16}  {r['score']:.6f}")


# ---------------------------------------------------------------------- export / import
@cli.command()
@click.argument("store", type=click.Path())
@click.option("--hdf5", "out", type=click.Path(), required=True, help="Output file (all_feats, all_labels, count).")
@click.option("--split", default=None, help="Export only the rows of this split.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def export(ctx: click.Context, store: str, out: str, split: str | None, quiet: bool) -> None:
    """Write a store in the low-shot HDF5 layout."""
    from featstore.hdf5io import export_hdf5

    count = export_hdf5(store, out, split=split, progress=_progress_enabled(ctx, quiet))
    click.echo(f"wrote {count} rows to {out}")


@cli.command("import")
@click.argument("h5", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Store to create.")
@click.option("--classes", "classes_file", type=click.Path(), default=None,
              help="Text file with one class name per line (line i = label i).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--chunk-rows", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--compression", type=click.Choice(["none", "lz4", "zstd"]), default="none", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def import_(ctx: click.Context, h5: str, out: str, classes_file: str | None, dtype: str, chunk_rows: int,
            compression: str, quiet: bool) -> None:
    """Make a store from a low-shot HDF5 feature file."""
    from featstore.hdf5io import import_hdf5

    classes = None
    if classes_file is not None:
        path = Path(classes_file)
        if not path.is_file():
            raise UserError(f"no classes file at {path}")
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    st = import_hdf5(h5, out, classes=classes, chunk_rows=chunk_rows, dtype=dtype, compression=compression,
                     progress=_progress_enabled(ctx, quiet))
    click.echo(f"imported {st.n} rows x {st.dim} ({len(st.classes)} classes) into {st.path}")


@cli.command()
@click.argument("store", type=click.Path())
@click.argument("name")
@click.option("--of", "within", multiple=True, help="Only rows of this split (repeatable: rows in all of them).")
@click.option("--rule", default=None, help='Per-sample meta rule, e.g. "drawer<=16" or "drawer>=3 & alphabet!=2".')
@click.option("--exclude", multiple=True, help="Leave out the rows of this split (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing split of that name.")
def split(store: str, name: str, within: tuple[str, ...], rule: str | None, exclude: tuple[str, ...],
          overwrite: bool) -> None:
    """Save a named subset of rows: the rows of every --of split that satisfy --rule, minus --exclude.

    \b
    featstore split omniglot.zarr train --of background --rule "drawer<=16"
    featstore split omniglot.zarr val   --of background --rule "drawer>=17"
    """
    from featstore.rules import rule_mask

    st = FeatureStore.open(store)
    try:
        mask = np.ones(st.n, dtype=bool)
        for other in (*within, *exclude):
            if other not in st.split_names:
                raise UserError(f"store {st.path} has no split {other!r} (it has: "
                                f"{', '.join(st.split_names) or 'none'})")
        for other in within:
            keep = np.zeros(st.n, dtype=bool)
            keep[st.split(other)] = True
            mask &= keep
        if rule:
            mask &= rule_mask(st, rule, "--rule")
        for other in exclude:
            mask[st.split(other)] = False
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            raise UserError(f"split {name!r} would be empty: no row of {st.path} passes the selection")
        st.add_split(name, rows, overwrite=overwrite, wait=NODE_LOCK_WAIT)
        n_classes = len(np.unique(st.labels[rows]))
    finally:
        st.close()
    click.echo(f"split {name!r}: {len(rows)} rows of {n_classes} classes")


main = main_entry(cli, "featstore")

if __name__ == "__main__":
    main()
