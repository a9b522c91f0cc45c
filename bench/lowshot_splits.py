"""The sets ``bench lowshot`` is measured on: base and novel classes in validation and test halves, disjoint
training and test samples, and the split files that fix every experiment's n examples per novel class
(Hariharan & Girshick, ICCV 2017; the split-file layout of the original code,
facebookresearch/low-shot-shrink-hallucinate).

Everything that fixes the experiments (classes, sample subsets, seed) is recorded in ``protocol.json`` in the
results folder; a later run with other options there stops with a one-line error. Split files
``splitfile_{e}.json``: one row per class of the store listing its training candidates (store rows) in a fixed
random order; the training set for n is the first n of each novel row, so n = 1 within 2 within 5 within 10
within 20. The original files are read verbatim; missing ones are generated and recorded in ``splitfiles.json``.

``cfg`` below is a :class:`bench.lowshot.LowShotConfig` (read, never changed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.head_cache import sha256_json
from featstore.atomic import write_atomic
from featstore.checkpoint import sha256_file
from featstore.errors import UserError
from featstore.rules import rule_mask

DEFAULT_TEST_FRACTION = 0.2
PROTOCOL_FORMAT = "featstore.lowshot.protocol/1"
SPLITFILES_FORMAT = "featstore.lowshot.splitfiles/1"
SPLITFILE_NAME = "splitfile_{:d}.json"


def sha256_rows(rows: np.ndarray) -> str:
    from featstore.store import rows_sha256  # here: featstore.store would put zarr into every CLI start

    return rows_sha256(rows)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {' '.join(str(exc).split())[:120]}") from None


# ================================================================================================== store checks
def trailing_zero_rows(store, block: int = 4096) -> int:
    """Number of all-zero feature rows at the end of the store (the padding signature of the original HDF5
    files: rows >= count left at the fill value 0 and labelled 0)."""
    n = store.n
    count = 0
    hi = n
    while hi > 0:
        lo = max(0, hi - block)
        x = store.gather(np.arange(lo, hi), dtype="float32")
        nonzero = np.flatnonzero(x.any(axis=1))
        if len(nonzero):
            count += (hi - lo) - 1 - int(nonzero[-1])
            return count
        count += hi - lo
        hi = lo
    return count


def check_store(store, role: str) -> None:
    """Refuse an unfinished store, labels outside the class list, or padding rows at the end."""
    if not store.complete:
        done = store.done_chunks()
        raise UserError(f"{role} {store.path} is not complete ({int(done.sum())}/{len(done)} chunks done); finish "
                        f"the extraction first")
    labels = store.labels
    C = len(store.classes)
    if len(labels) and (labels.min() < 0 or labels.max() >= C):
        raise UserError(f"{role} {store.path} has labels outside 0..{C - 1}; it does not match its class list")
    pad = trailing_zero_rows(store)
    if pad:
        tail = np.unique(labels[store.n - pad:])
        raise UserError(f"{role} {store.path} ends with {pad} all-zero feature row(s) (rows {store.n - pad}.."
                        f"{store.n - 1}, labels {', '.join(str(int(v)) for v in tail[:5])}): padding of an HDF5 file "
                        f"whose count was not honoured, which would pollute class {int(tail[0])}; re-import it with "
                        f"`featstore import` (it drops rows >= count)")


# ================================================================================================== classes and samples
@dataclass
class ClassSetup:
    base_1: list[int]
    base_2: list[int]
    novel_1: list[int]
    novel_2: list[int]
    request: dict

    def for_setup(self, setup: str) -> tuple[list[int], list[int]]:
        if setup == "val":
            return self.base_1, self.novel_1
        if setup == "test":
            return self.base_2, self.novel_2
        return sorted(self.base_1 + self.base_2), sorted(self.novel_1 + self.novel_2)

    @property
    def all_base(self) -> list[int]:
        return sorted(self.base_1 + self.base_2)

    @property
    def all_novel(self) -> list[int]:
        return sorted(self.novel_1 + self.novel_2)

    def lists(self) -> dict:
        return {"base_1": self.base_1, "base_2": self.base_2, "novel_1": self.novel_1, "novel_2": self.novel_2}


@dataclass
class Protocol:
    classes: ClassSetup
    train_rows: np.ndarray          # rows of the train store
    test_rows: np.ndarray           # rows of the test store (the same store unless --test-store)
    samples: dict                   # how the two subsets were made
    splitfiles: list[list[np.ndarray]]   # [experiment][class] -> candidate rows in order
    splitfile_info: dict
    seed: int
    notes: list[str] = field(default_factory=list)


def _halves(classes: Sequence[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Seeded split of a class list into a validation half (_1) and a test half (_2, the larger one)."""
    perm = rng.permutation(np.asarray(sorted(classes), dtype=np.int64))
    k = len(perm) // 2
    return sorted(int(c) for c in perm[:k]), sorted(int(c) for c in perm[k:])


def _classes_of(store, name: str, labels: np.ndarray, option: str) -> list[int]:
    if name in store.class_splits:
        return sorted(int(c) for c in store.class_splits[name])
    if name in store.split_names:
        return sorted(int(c) for c in np.unique(labels[store.split(name)]))
    known = sorted(set(store.class_splits) | set(store.split_names))
    raise UserError(f"{option} {name!r}: store {store.path} has no class split or sample split of that name (it "
                    f"has: {', '.join(known) or 'none'})")


def resolve_classes(cfg: Any, store, train_rows: np.ndarray, seed: int) -> ClassSetup:
    """Base / novel classes in validation and test halves (see the module doc for the order of sources)."""
    classes = store.classes
    C = len(classes)
    labels = store.labels
    has_train = np.zeros(C, dtype=bool)
    has_train[np.unique(labels[train_rows])] = True
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xC1A55])

    if cfg.label_idx:
        path = Path(cfg.label_idx)
        idx = read_json(path, "label index (--label-idx)")
        keys = ("base_classes_1", "base_classes_2", "novel_classes_1", "novel_classes_2")
        if not isinstance(idx, dict) or any(k not in idx for k in keys):
            raise UserError(f"--label-idx {path}: needs the keys {', '.join(keys)} (the original label_idx.json)")
        names = idx.get("label_names")
        if names is not None:
            names = [str(c) for c in names]
            numeric = classes == [str(i) for i in range(C)]
            if len(names) != C:
                raise UserError(f"--label-idx {path} has {len(names)} label_names but store {store.path} has {C} "
                                f"classes; they must be the same classes in the same order")
            if not numeric and names != classes:
                k = next(i for i, (a, b) in enumerate(zip(names, classes)) if a != b)
                raise UserError(f"--label-idx {path}: label {k} is {names[k]!r} there but {classes[k]!r} in the "
                                f"store; the store must use the file's custom label order")
        lists = {}
        for key in keys:
            vals = idx[key]
            if not isinstance(vals, list) or not all(isinstance(v, int) and 0 <= v < C for v in vals):
                raise UserError(f"--label-idx {path}: {key} must be a list of class indices 0..{C - 1} (the store "
                                f"has {C} classes)")
            lists[key] = sorted(int(v) for v in vals)
        setup = ClassSetup(lists["base_classes_1"], lists["base_classes_2"], lists["novel_classes_1"],
                           lists["novel_classes_2"], {"source": "label_idx", "sha256": sha256_file(path)})
    elif cfg.base_classes or cfg.novel_classes:
        base = _classes_of(store, cfg.base_classes, labels, "--base-classes") if cfg.base_classes else None
        novel = _classes_of(store, cfg.novel_classes, labels, "--novel-classes") if cfg.novel_classes else None
        present = [c for c in range(C) if has_train[c]]
        if base is None:
            base = [c for c in present if c not in set(novel)]
        if novel is None:
            novel = [c for c in present if c not in set(base)]
        b1, b2 = _halves(base, rng)
        n1, n2 = _halves(novel, rng)
        setup = ClassSetup(b1, b2, n1, n2, {"source": "splits", "base": cfg.base_classes,
                                            "novel": cfg.novel_classes})
    elif all(k in store.class_splits for k in ("base_1", "base_2", "novel_1", "novel_2")):
        cs = store.class_splits
        setup = ClassSetup(*(sorted(int(c) for c in cs[k]) for k in ("base_1", "base_2", "novel_1", "novel_2")),
                           {"source": "store class splits base_1, base_2, novel_1, novel_2"})
    elif "base" in store.class_splits or ("base" in store.split_names and "novel" in store.split_names):
        base = _classes_of(store, "base", labels, "class split")
        if "novel" in store.class_splits or "novel" in store.split_names:
            novel = _classes_of(store, "novel", labels, "class split")
        else:
            novel = [c for c in range(C) if has_train[c] and c not in set(base)]
        b1, b2 = _halves(base, rng)
        n1, n2 = _halves(novel, rng)
        setup = ClassSetup(b1, b2, n1, n2, {"source": "store splits base / novel, halved with the seed"})
    else:
        ckpt = [str(c) for c in (store.provenance or {}).get("checkpoint_classes") or []]
        index = {name: k for k, name in enumerate(classes)}
        seen = sorted(index[c] for c in ckpt if c in index)
        if seen:
            base = seen
            novel = [c for c in range(C) if has_train[c] and c not in set(seen)]
            b1, b2 = _halves(base, rng)
            n1, n2 = _halves(novel, rng)
            setup = ClassSetup(b1, b2, n1, n2, {"source": "checkpoint_classes (the backbone's training classes "
                                                          "are base)"})
        else:
            present = np.flatnonzero(has_train)
            perm = rng.permutation(present)
            k = len(perm) // 2
            b1, b2 = _halves(perm[:k].tolist(), rng)
            n1, n2 = _halves(perm[k:].tolist(), rng)
            setup = ClassSetup(b1, b2, n1, n2, {"source": "drawn with the seed (half base, half novel)"})
    _check_classes(setup, store, cfg, has_train)
    return setup


def _check_classes(setup: ClassSetup, store, cfg: Any, has_train: np.ndarray) -> None:
    names = store.classes
    lists = setup.lists()
    seen: dict[int, str] = {}
    for key, vals in lists.items():
        for c in vals:
            if c in seen:
                raise UserError(f"class {names[c]!r} is in both {seen[c]} and {key}; base and novel class lists must "
                                f"be disjoint")
            seen[c] = key
    base, novel = setup.for_setup(cfg.setup)
    if not base or not novel:
        raise UserError(f"setup {cfg.setup!r} has {len(base)} base and {len(novel)} novel classes; it needs at "
                        f"least one of each (the store has {len(names)} classes; pick other classes or --setup all)")
    no_rows = [c for c in base if not has_train[c]]
    if no_rows:
        raise UserError(f"base class {names[no_rows[0]]!r} has no training rows in store {store.path}; the class "
                        f"lists do not match the store (or the training subset is too small)")
    ckpt = set(str(c) for c in (store.provenance or {}).get("checkpoint_classes") or [])
    leaked = [c for c in setup.all_novel if names[c] in ckpt]
    if leaked and not cfg.allow_seen_novel:
        raise UserError(f"the backbone of store {store.path} was trained on {len(leaked)} of the novel classes (e.g. "
                        f"{names[leaked[0]]!r}); novel classes must be unseen: choose other classes (--base-classes "
                        f"/ --novel-classes / --label-idx) or pass --allow-seen-novel")


def resolve_samples(cfg: Any, store, test_store, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train rows of ``store``, test rows of ``test_store``, description)."""
    separate = test_store is not store
    if cfg.train_split and cfg.train_rule:
        raise UserError("give --train-split or --train-rule, not both")
    if cfg.test_split and cfg.test_rule:
        raise UserError("give --test-split or --test-rule, not both")
    if cfg.test_fraction is not None and not 0 < cfg.test_fraction < 1:
        raise UserError(f"--test-fraction must lie between 0 and 1, not {cfg.test_fraction}")
    explicit = any((cfg.train_split, cfg.train_rule, cfg.test_split, cfg.test_rule))
    if cfg.test_fraction is not None and (explicit or separate):
        raise UserError("--test-fraction applies only when no --train/--test split or rule and no --test-store "
                        "is given")

    def side(split, rule, st, option):
        if split:
            return st.split(split), {"split": split}
        if rule:
            return np.flatnonzero(rule_mask(st, rule, option)), {"rule": rule}
        return None, None

    train, train_how = side(cfg.train_split, cfg.train_rule, store, "--train-rule")
    test, test_how = side(cfg.test_split, cfg.test_rule, test_store, "--test-rule")
    if separate:
        if train is None:
            train, train_how = np.arange(store.n), {"all rows": True}
        if test is None:
            test, test_how = np.arange(test_store.n), {"all rows": True}
    elif train is None and test is None:
        frac = DEFAULT_TEST_FRACTION if cfg.test_fraction is None else cfg.test_fraction
        labels = store.labels
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x401D])
        perm = rng.permutation(store.n)
        order = perm[np.argsort(labels[perm], kind="stable")]
        counts = np.bincount(labels, minlength=len(store.classes))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(store.n) - starts[labels[order]]
        k_test = np.where(counts >= 2, np.clip(np.round(counts * frac), 1, counts - 1), 0).astype(np.int64)
        is_test = np.zeros(store.n, dtype=bool)
        is_test[order] = rank < k_test[labels[order]]
        train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        train_how = {"holdout": frac}
        test_how = {"holdout": frac}
    elif train is None:
        mask = np.ones(store.n, dtype=bool)
        mask[test] = False
        train, train_how = np.flatnonzero(mask), {"complement of the test subset": True}
    elif test is None:
        mask = np.ones(store.n, dtype=bool)
        mask[train] = False
        test, test_how = np.flatnonzero(mask), {"complement of the training subset": True}
    train = np.unique(np.asarray(train, dtype=np.int64))
    test = np.unique(np.asarray(test, dtype=np.int64))
    if not separate:
        shared = np.intersect1d(train, test)
        if len(shared):
            raise UserError(f"the training and test subsets share {len(shared)} row(s) (e.g. row {int(shared[0])}); "
                            f"make them disjoint (e.g. --train-rule \"drawer<=16\" --test-rule \"drawer>=17\")")
    if not len(train):
        raise UserError("the training subset is empty; check --train-split / --train-rule")
    if not len(test):
        raise UserError("the test subset is empty; check --test-split / --test-rule")
    how = {"train": train_how, "test": test_how,
           "test_store": None if not separate else test_store.fingerprint_hash}
    return train, test, how


def check_test_store(store, test_store) -> None:
    if test_store.classes != store.classes:
        raise UserError(f"--test-store {test_store.path} has other classes than --store {store.path}; both must "
                        f"list the same classes in the same order")
    if test_store.dim != store.dim:
        raise UserError(f"--test-store {test_store.path} has {test_store.dim}-dim features but --store has "
                        f"{store.dim}")
    a, b = store.fingerprint or {}, test_store.fingerprint or {}
    for key in ("model", "weights", "checkpoint_sha256", "transform"):
        if key in a and key in b and a[key] != b[key]:
            raise UserError(f"--store and --test-store were extracted differently ({key} differs); the features of "
                            f"both must come from one backbone checkpoint and transform")


def _read_splitfile(path: Path, C: int) -> list[np.ndarray]:
    data = read_json(path, "split file")
    if not isinstance(data, list):
        raise UserError(f"split file {path} must be a JSON list with one row of row indices per class")
    if len(data) != C:
        raise UserError(f"split file {path} has {len(data)} rows but the store has {C} classes; it was made for "
                        f"another store")
    out = []
    for c, row in enumerate(data):
        if not isinstance(row, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
            raise UserError(f"split file {path}: row {c} is not a list of row indices")
        out.append(np.asarray(row, dtype=np.int64))
    return out


def _make_splitfile(labels: np.ndarray, train_rows: np.ndarray, C: int, seed: int) -> list[np.ndarray]:
    """Row c = every training candidate of class c, in a seeded random order."""
    rng = np.random.default_rng(seed)
    rows = rng.permutation(train_rows)
    rows = rows[np.argsort(labels[rows], kind="stable")]
    bounds = np.searchsorted(labels[rows], np.arange(C + 1))
    return [rows[bounds[c]:bounds[c + 1]] for c in range(C)]


def load_or_make_splitfiles(store, train_rows: np.ndarray, test_rows: np.ndarray | None, experiments: int,
                            directory: Path, seed: int, check_classes: Sequence[int], need: int = 1
                            ) -> tuple[list[list[np.ndarray]], dict]:
    """Split files 1..experiments from ``directory``: read when present (ours: checked against ``splitfiles.json``;
    foreign ones such as the original ImageNet files: checked row by row), generated when absent.

    ``check_classes`` (the setup's novel classes) are checked row by row: store rows of that class, inside the
    training subset, outside the test subset, no repeats, and at least ``need`` candidates (else UserError naming
    the class and the largest feasible n). Generated files are written only after every check passed."""
    C = len(store.classes)
    labels = store.labels
    meta_path = directory / "splitfiles.json"
    files = [directory / SPLITFILE_NAME.format(e) for e in range(1, experiments + 1)]
    present = [f.is_file() for f in files]
    meta = read_json(meta_path, "split-file record") if meta_path.is_file() else None
    ours = meta is not None
    if any(present) and not ours and not all(present):
        missing = files[present.index(False)]
        raise UserError(f"{directory} holds split files but not {missing.name}; --experiments {experiments} needs "
                        f"splitfile_1..{experiments}.json there (or use fewer experiments)")
    classes_sha = sha256_json(store.classes)
    train_sha = sha256_rows(train_rows)
    if ours:
        if not isinstance(meta, dict) or meta.get("format") != SPLITFILES_FORMAT:
            raise UserError(f"{meta_path} is not a featstore split-file record; remove it or use another folder")
        if meta.get("store_fingerprint_hash") != store.fingerprint_hash:
            raise UserError(f"the split files in {directory} were made for another store (fingerprint "
                            f"{str(meta.get('store_fingerprint_hash'))[:12]}, this store "
                            f"{store.fingerprint_hash[:12]}); "
                            f"use another --out / --splitfile-dir or delete them")
        if meta.get("classes_sha256") != classes_sha:
            raise UserError(f"the split files in {directory} were made for another class list; use another --out / "
                            f"--splitfile-dir or delete them")
        if meta.get("train_rows_sha256") != train_sha:
            raise UserError(f"the split files in {directory} were made from another training subset; use the same "
                            f"--train-split / --train-rule / --test-fraction, another --out, or delete them")
    records = dict((meta or {}).get("experiments") or {})
    result = []
    new: dict[int, int] = {}
    for e, path in enumerate(files, start=1):
        if path.is_file():
            sf = _read_splitfile(path, C)
        else:
            s = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5F11E, e]).generate_state(1)[0])
            sf = _make_splitfile(labels, train_rows, C, s)
            new[e] = s
        result.append(sf)
    # Row-by-row checks of the rows that will be used (cheap; catches foreign files for another row order).
    in_train = np.zeros(store.n, dtype=bool)
    in_train[train_rows] = True
    in_test = np.zeros(store.n, dtype=bool)
    if test_rows is not None:
        in_test[test_rows] = True
    for e, sf in enumerate(result, start=1):
        for c in check_classes:
            row = sf[c]
            if not len(row):
                continue
            if row.min() < 0 or row.max() >= store.n:
                raise UserError(f"{files[e - 1].name}: class {store.classes[c]!r} lists row {int(row.max())} but the "
                                f"store has {store.n} rows; the split files do not match this store")
            bad = np.flatnonzero(labels[row] != c)
            if len(bad):
                r = int(row[bad[0]])
                raise UserError(f"{files[e - 1].name}: class {c} ({store.classes[c]!r}) lists row {r}, whose label is "
                                f"{int(labels[r])} ({store.classes[int(labels[r])]!r}); the split files do not match "
                                f"this store's row or label order")
            if len(np.unique(row)) != len(row):
                raise UserError(f"{files[e - 1].name}: class {store.classes[c]!r} lists a row twice")
            if in_test[row].any():
                r = int(row[np.flatnonzero(in_test[row])[0]])
                raise UserError(f"{files[e - 1].name}: class {store.classes[c]!r} lists row {r}, which is a test "
                                f"image; training candidates and test images must be disjoint")
            if not in_train[row].all():
                r = int(row[np.flatnonzero(~in_train[row])[0]])
                raise UserError(f"{files[e - 1].name}: class {store.classes[c]!r} lists row {r}, which is outside the "
                                f"training subset")
    # Feasibility: every checked class needs ``need`` candidates in every experiment.
    if len(check_classes):
        counts = np.array([min(len(sf[c]) for sf in result) for c in check_classes])
        if (counts < need).any():
            worst = int(np.argmin(counts))
            c = check_classes[worst]
            raise UserError(f"novel class {store.classes[c]!r} has only {int(counts[worst])} training candidate(s); "
                            f"n = {need} is infeasible, the largest feasible n is {int(counts.min())} (use --shots "
                            f"with values up to {int(counts.min())}, or a larger training subset)")
    wrote = []
    for e, s in new.items():
        path = files[e - 1]
        write_atomic(path, json.dumps([row.tolist() for row in result[e - 1]], separators=(",", ":")))
        records[str(e)] = {"seed": s, "sha256": sha256_file(path)}
        wrote.append(path.name)
    if wrote:
        ours = True
        meta = {"format": SPLITFILES_FORMAT, "store_fingerprint_hash": store.fingerprint_hash,
                "store_path": str(store.path), "classes_sha256": classes_sha, "train_rows_sha256": train_sha,
                "n_train_rows": int(len(train_rows)), "experiments": records,
                "layout": "row c = the training candidates of class c (store rows) in a fixed random order; the "
                          "training set for n is the first n of each novel row"}
        write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
    info = {"dir": str(directory), "generated_now": wrote, "kind": "featstore" if ours else "external (verbatim)",
            "files": {p.name: sha256_file(p) for p in files}}
    return result, info


def build_protocol(cfg: Any, store, test_store, ns: Sequence[int]) -> Protocol:
    """Classes, sample subsets and split files for this run; checked against (or recorded in) --out/protocol.json."""
    out = Path(cfg.out)
    ppath = out / "protocol.json"
    saved = read_json(ppath, "protocol record") if ppath.is_file() else None
    notes = []
    if saved is not None:
        if not isinstance(saved, dict) or saved.get("format") != PROTOCOL_FORMAT:
            raise UserError(f"{ppath} is not a featstore low-shot protocol record; use another --out")
        if saved.get("store_fingerprint_hash") != store.fingerprint_hash:
            raise UserError(f"--out {out} holds a low-shot protocol for another store (fingerprint "
                            f"{str(saved.get('store_fingerprint_hash'))[:12]} vs {store.fingerprint_hash[:12]}); use "
                            f"another --out or delete {ppath}")
        if saved.get("classes_sha256") != sha256_json(store.classes):
            raise UserError(f"--out {out} holds a low-shot protocol for another class list; use another --out")
        pseed = int(saved["seed"])
        if pseed != cfg.seed:
            notes.append(f"classes, sample subsets and split files are those of {ppath} (made with seed {pseed}); "
                         f"--seed {cfg.seed} seeds the training only")
    else:
        pseed = int(cfg.seed)
    train_rows, test_rows, samples = resolve_samples(cfg, store, test_store, pseed)
    classes = resolve_classes(cfg, store, train_rows, pseed)
    record = {"format": PROTOCOL_FORMAT, "store_fingerprint_hash": store.fingerprint_hash,
              "classes_sha256": sha256_json(store.classes), "seed": pseed,
              "classes": {"request": classes.request, **classes.lists()},
              "samples": {"request": samples, "train_rows_sha256": sha256_rows(train_rows),
                          "test_rows_sha256": sha256_rows(test_rows)}}
    if saved is not None:
        for part, what in (("samples", "training / test subsets (--train-split/--test-split/--train-rule/--test-rule/"
                                       "--test-fraction/--test-store)"),
                           ("classes", "base / novel classes (--label-idx/--base-classes/--novel-classes)")):
            if sha256_json(saved.get(part)) != sha256_json(record[part]):
                raise UserError(f"--out {out} holds a low-shot protocol with other {what}; use the same options, "
                                f"another --out, or delete {ppath} and the split files")
    base, novel = classes.for_setup(cfg.setup)
    directory = Path(cfg.splitfile_dir) if cfg.splitfile_dir else out
    if cfg.splitfile_dir and not directory.is_dir():
        raise UserError(f"--splitfile-dir {directory} is not a folder")
    splitfiles, info = load_or_make_splitfiles(store, train_rows, test_rows if test_store is store else None,
                                               cfg.experiments, directory, pseed, novel, need=max(ns))
    if saved is None:  # only once everything checked out, so that a failed first run fixes nothing
        write_atomic(ppath, json.dumps(record, indent=1) + "\n")
    return Protocol(classes, train_rows, test_rows, samples, splitfiles, info, pseed, notes)
