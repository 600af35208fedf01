"""Checks of a spec's `train.data`: the sources exist, and no key is set that means nothing here."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import did_you_mean
from .sets import DATASETS, SPLITS, is_file_name
from .splits import GENERATED, sharing


def data_problems(d) -> list[tuple[tuple, str, bool]]:
    """(path under train.data, message, points at the key) for each problem of DataSpec `d`.

    File paths are expected absolute (`load_spec` resolves them against the spec's folder).
    """
    out: list[tuple[tuple, str, bool]] = []
    sources = {s: d.source(s) for s in SPLITS}
    for key in ("name", *SPLITS):
        src = getattr(d, key)
        if src is None:
            continue
        if is_file_name(src):
            if not Path(src).is_file():
                out.append(
                    (
                        (key,),
                        f"no such data file '{src}' (paths are relative to the spec's folder)",
                        False,
                    )
                )
        elif src not in DATASETS:
            out.append(
                (
                    (key,),
                    f"unknown data set '{src}'{did_you_mean(src, DATASETS)}; a built-in name "
                    "or a .npz/.pt file",
                    False,
                )
            )
    # keys that mean something only for some sources are errors elsewhere, not ignored
    generated = any(s in GENERATED for s in sources.values())
    for key in ("n_train", "n_val", "n_test", "fresh"):
        if key in d.model_fields_set and not generated:
            out.append(
                (
                    (key,),
                    f"`{key}` applies to generated data sets ({', '.join(GENERATED)}); "
                    "this data has the size it has",
                    True,
                )
            )
    if d.params and all(is_file_name(s) for s in sources.values()):
        out.append((("params",), "`params` applies to built-in data sets", True))
    if "split" in d.model_fields_set and all(len(sharing(d, s)) == 1 for s in SPLITS):
        out.append(
            (
                ("split",),
                "`split` divides a file that serves several splits; no file does here",
                True,
            )
        )
    return out
