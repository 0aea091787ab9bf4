"""Verification pairs: LFW pairs.txt, a generic CSV, pairs built from labels, and pair images.

A :class:`PairSet` lists pairs either as image paths (``paths1[k]``, ``paths2[k]``) or as index pairs
(``i[k]``, ``j[k]``) into an embedded dataset, with ``same[k]`` (genuine pair) and ``folds[k]``
(cross-validation fold, see :func:`deepmetric.verification.protocol.lfw_protocol`).

Every loader raises :class:`~deepmetric.errors.DataError` naming the file and line for a malformed line,
a missing image or a header whose counts do not match, and for a pair set that has only genuine or
only impostor pairs (the ROC is then undefined).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from deepmetric.errors import ConfigError, DataError
from deepmetric.verification.protocol import contiguous_folds

__all__ = [
    "PairSet",
    "lfw_image_path",
    "load_lfw_pairs",
    "load_pairs_csv",
    "load_pair_images",
    "make_pairs_from_labels",
]

_TRUE = {"1", "true", "yes", "same", "genuine"}
_FALSE = {"0", "false", "no", "different", "impostor"}


@dataclass(frozen=True)
class PairSet:
    """Verification pairs: image paths **or** index pairs, with labels and folds.

    Attributes:
        same: ``(N,)`` bool, ``True`` for a genuine pair.
        folds: ``(N,)`` int64 fold id of each pair.
        paths1, paths2: image paths of the two sides (path-based pair sets), else ``None``.
        i, j: ``(N,)`` int64 indices into a dataset (index-based pair sets), else ``None``.
    """

    same: np.ndarray
    folds: np.ndarray
    paths1: list[str] | None = None
    paths2: list[str] | None = None
    i: np.ndarray | None = None
    j: np.ndarray | None = None

    def __post_init__(self) -> None:
        same = np.asarray(self.same)
        if same.dtype != bool:
            if not np.issubdtype(same.dtype, np.number) or not np.all((same == 0) | (same == 1)):
                raise DataError("PairSet.same must be boolean (or 0/1)")
            same = same.astype(bool)
        folds = np.asarray(self.folds)
        if same.ndim != 1 or folds.shape != same.shape:
            raise DataError(f"PairSet.same and folds must be 1-D of equal length; got {same.shape}, {folds.shape}")
        if not np.issubdtype(folds.dtype, np.integer):
            raise DataError(f"PairSet.folds must be integers; got dtype {folds.dtype}")
        has_paths = self.paths1 is not None or self.paths2 is not None
        has_index = self.i is not None or self.j is not None
        if has_paths == has_index:
            raise DataError("a PairSet has either paths1/paths2 or i/j (exactly one of the two kinds)")
        n = same.shape[0]
        if has_paths:
            if self.paths1 is None or self.paths2 is None or len(self.paths1) != n or len(self.paths2) != n:
                raise DataError(f"PairSet.paths1 and paths2 must both list {n} paths")
            object.__setattr__(self, "paths1", [str(p) for p in self.paths1])
            object.__setattr__(self, "paths2", [str(p) for p in self.paths2])
        else:
            i = np.asarray(self.i)
            j = np.asarray(self.j)
            if i.shape != (n,) or j.shape != (n,) or not (
                np.issubdtype(i.dtype, np.integer) and np.issubdtype(j.dtype, np.integer)
            ):
                raise DataError(f"PairSet.i and j must be integer arrays of length {n}")
            object.__setattr__(self, "i", i.astype(np.int64))
            object.__setattr__(self, "j", j.astype(np.int64))
        object.__setattr__(self, "same", same)
        object.__setattr__(self, "folds", folds.astype(np.int64))

    def __len__(self) -> int:
        return int(self.same.shape[0])

    @property
    def num_genuine(self) -> int:
        return int(self.same.sum())

    @property
    def num_impostor(self) -> int:
        return len(self) - self.num_genuine

    @property
    def num_folds(self) -> int:
        return int(np.unique(self.folds).shape[0])


def _check_two_classes(same: np.ndarray, source: str) -> None:
    num_genuine = int(np.sum(same))
    if num_genuine == 0 or num_genuine == same.shape[0]:
        kind = "impostor (different)" if num_genuine == 0 else "genuine (same)"
        raise DataError(
            f"{source}: all {same.shape[0]} pairs are {kind}; verification needs both genuine and "
            "impostor pairs (the ROC is undefined otherwise)"
        )


def lfw_image_path(root: str | os.PathLike[str], name: str, number: int) -> Path:
    """``<root>/<name>/<name>_<number:04d>.jpg``, the LFW layout."""
    return Path(root) / name / f"{name}_{number:04d}.jpg"


def _parse_index(token: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise DataError(f"{where}: image number {token!r} is not an integer") from None
    if value < 1:
        raise DataError(f"{where}: image number {value} must be >= 1 (LFW numbers images from 0001)")
    return value


def load_lfw_pairs(
    root: str | os.PathLike[str],
    pairs_file: str | os.PathLike[str] = "pairs.txt",
    *,
    check_images: bool = True,
) -> PairSet:
    """Read LFW's ``pairs.txt`` (View 2) or a file in the same format.

    Layout: images at ``<root>/<Name>/<Name>_0001.jpg``; the pairs file (relative to ``root`` unless
    absolute) starts with a header ``"<folds>\\t<n>"`` (``10\\t300`` for View 2), then, for each fold,
    ``n`` matched lines ``Name<TAB>idx1<TAB>idx2`` followed by ``n`` mismatched lines
    ``Name1<TAB>idx1<TAB>Name2<TAB>idx2``. A header with a single number ``n`` (``pairsDevTrain.txt``)
    means one fold. Fields may be separated by any whitespace; blank lines are ignored.

    Args:
        root: the LFW image folder (``lfw/`` or ``lfw-deepfunneled/``).
        pairs_file: the pairs file.
        check_images: raise if an image is missing (checked for every pair).

    Returns:
        A path-based :class:`PairSet`; ``folds[k]`` is the fold of the k-th pair, in file order.

    Raises:
        DataError: naming the file and line for a bad header, a malformed line (wrong number of fields,
            a matched line where a mismatched one is due or vice versa, non-integer image number), a
            line count that does not match the header, a missing image, or a single class of pairs.
    """
    root = Path(root)
    path = Path(pairs_file)
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    lines = [(number, line.split()) for number, line in enumerate(path.read_text().splitlines(), start=1)]
    lines = [(number, fields) for number, fields in lines if fields]
    if not lines:
        raise DataError(f"{path}: empty pairs file (expected a header '<folds>\\t<pairs per fold>')")
    header_line, header = lines[0]
    try:
        counts = [int(x) for x in header]
    except ValueError:
        counts = []
    if len(counts) == 1:
        num_folds, per_fold = 1, counts[0]
    elif len(counts) == 2:
        num_folds, per_fold = counts
    else:
        raise DataError(
            f"{path}:{header_line}: bad header {' '.join(header)!r}; expected '<folds>\\t<pairs per fold>' "
            "such as '10\\t300'"
        )
    if num_folds < 1 or per_fold < 1:
        raise DataError(f"{path}:{header_line}: header counts must be positive; got {num_folds} and {per_fold}")
    body = lines[1:]
    expected = 2 * num_folds * per_fold
    if len(body) != expected:
        raise DataError(
            f"{path}:{header_line}: header says {num_folds} fold(s) x {per_fold} matched + {per_fold} "
            f"mismatched pairs = {expected} pair lines, but the file has {len(body)}"
        )
    paths1: list[str] = []
    paths2: list[str] = []
    same = np.empty(expected, dtype=bool)
    folds = np.empty(expected, dtype=np.int64)
    missing: list[tuple[int, Path]] = []
    for k, (number, fields) in enumerate(body):
        where = f"{path}:{number}"
        fold, position = divmod(k, 2 * per_fold)
        matched = position < per_fold
        if matched:
            if len(fields) != 3:
                raise DataError(
                    f"{where}: expected a matched pair 'Name<TAB>idx1<TAB>idx2' (pair {position + 1} of "
                    f"fold {fold + 1}), got {len(fields)} field(s): {' '.join(fields)!r}"
                )
            name1, name2 = fields[0], fields[0]
            n1, n2 = _parse_index(fields[1], where), _parse_index(fields[2], where)
        else:
            if len(fields) != 4:
                raise DataError(
                    f"{where}: expected a mismatched pair 'Name1<TAB>idx1<TAB>Name2<TAB>idx2' (pair "
                    f"{position + 1 - per_fold} of fold {fold + 1}'s mismatched block), got "
                    f"{len(fields)} field(s): {' '.join(fields)!r}"
                )
            name1, name2 = fields[0], fields[2]
            if name1 == name2:
                raise DataError(f"{where}: mismatched pair has the same name {name1!r} on both sides")
            n1, n2 = _parse_index(fields[1], where), _parse_index(fields[3], where)
        p1, p2 = lfw_image_path(root, name1, n1), lfw_image_path(root, name2, n2)
        if check_images:
            missing.extend((number, p) for p in (p1, p2) if not p.is_file())
        paths1.append(str(p1))
        paths2.append(str(p2))
        same[k] = matched
        folds[k] = fold
    if missing:
        number, first = missing[0]
        raise DataError(
            f"{path}:{number}: image {first} does not exist ({len(missing)} missing image reference(s) "
            f"in all; is root={str(root)!r} the folder holding the <Name>/ sub-folders?)"
        )
    _check_two_classes(same, str(path))
    return PairSet(same=same, folds=folds, paths1=paths1, paths2=paths2)


def _parse_same(value: str, where: str) -> bool:
    token = value.strip().lower()
    if token in _TRUE:
        return True
    if token in _FALSE:
        return False
    raise DataError(f"{where}: 'same' must be 1/0 (or true/false); got {value!r}")


def load_pairs_csv(
    path: str | os.PathLike[str], *, check_images: bool = True, num_folds: int = 10
) -> PairSet:
    """Read verification pairs from a CSV with header ``path1,path2,same`` and an optional ``fold``.

    Image paths are relative to the CSV's folder unless absolute; ``same`` is ``1``/``0`` (also
    ``true``/``false``); ``fold`` is an integer. Without a ``fold`` column the pairs are cut into
    ``num_folds`` contiguous folds (fewer when there are fewer pairs). Extra columns are ignored.

    Args:
        path: the CSV file.
        check_images: raise if an image is missing.
        num_folds: folds to make when the CSV has no ``fold`` column.

    Raises:
        DataError: naming the line for a missing column, a malformed value, a missing image, and for
            a file with no pairs or a single class of pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs CSV {path} does not exist")
    folder = path.parent
    paths1: list[str] = []
    paths2: list[str] = []
    same: list[bool] = []
    folds: list[int] = []
    missing: list[tuple[int, Path]] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file; expected a header 'path1,path2,same[,fold]'")
        columns = [c.strip().lower() for c in header]
        absent = [c for c in ("path1", "path2", "same") if c not in columns]
        if absent:
            raise DataError(
                f"{path}:1: header {','.join(header)!r} lacks column(s) {', '.join(absent)}; "
                "expected 'path1,path2,same[,fold]'"
            )
        col = {name: columns.index(name) for name in ("path1", "path2", "same")}
        fold_col = columns.index("fold") if "fold" in columns else None
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{number}"
            if len(row) != len(columns):
                raise DataError(f"{where}: expected {len(columns)} fields ({','.join(header)}), got {len(row)}")
            resolved = []
            for name in ("path1", "path2"):
                cell = row[col[name]].strip()
                if not cell:
                    raise DataError(f"{where}: empty {name}")
                p = Path(cell)
                resolved.append(p if p.is_absolute() else folder / p)
            same.append(_parse_same(row[col["same"]], where))
            if fold_col is not None:
                try:
                    folds.append(int(row[fold_col]))
                except ValueError:
                    raise DataError(f"{where}: fold {row[fold_col]!r} is not an integer") from None
            if check_images:
                missing.extend((number, p) for p in resolved if not p.is_file())
            paths1.append(str(resolved[0]))
            paths2.append(str(resolved[1]))
    if missing:
        number, first = missing[0]
        raise DataError(
            f"{path}:{number}: image {first} does not exist ({len(missing)} missing image reference(s) in all)"
        )
    if not same:
        raise DataError(f"{path}: no pairs after the header")
    same_array = np.asarray(same, dtype=bool)
    _check_two_classes(same_array, str(path))
    if fold_col is None:
        fold_array = contiguous_folds(len(same), min(num_folds, len(same)))
    else:
        fold_array = np.asarray(folds, dtype=np.int64)
    return PairSet(same=same_array, folds=fold_array, paths1=paths1, paths2=paths2)


def load_pair_images(
    paths: Sequence[str | os.PathLike[str]],
    image_size: int | tuple[int, int],
    grayscale: bool = False,
) -> Tensor:
    """Load and resize images with PIL into one uint8 tensor.

    Args:
        paths: image files.
        image_size: ``S`` (square) or ``(H, W)``; images are resized (bilinear) to it.
        grayscale: one channel (PIL mode ``L``) instead of RGB.

    Shape:
        returns ``(N, C, H, W)`` uint8, ``C`` = 1 or 3.

    Raises:
        DataError: naming the file that is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image_size, int):
        height, width = image_size, image_size
    else:
        height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ConfigError(f"image_size must be positive; got {image_size!r}")
    channels = 1 if grayscale else 3
    out = np.empty((len(paths), height, width, channels), dtype=np.uint8)
    for k, p in enumerate(paths):
        try:
            with Image.open(p) as image:
                converted = image.convert("L" if grayscale else "RGB").resize(
                    (width, height), Image.Resampling.BILINEAR
                )
                array = np.asarray(converted, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"image {p} does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {p} cannot be read: {exc}") from exc
        out[k] = array.reshape(height, width, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _sample_pairs(
    rng: np.random.Generator, counts: np.ndarray, starts: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct pairs ``(a, b)``, ``a < b`` positions, uniformly among the pairs enumerated by ``counts``.

    Position ``a`` is paired with ``counts[a]`` partners ``starts[a], starts[a] + 1, ...``; a pair is an
    integer of ``[0, counts.sum())``, decoded without enumerating all pairs.
    """
    cumulative = np.cumsum(counts)
    codes = rng.choice(int(cumulative[-1]), size=k, replace=False)
    a = np.searchsorted(cumulative, codes, side="right")
    before = cumulative[a] - counts[a]
    b = starts[a] + (codes - before)
    return a, b


def make_pairs_from_labels(
    labels: Any,
    num_pos: int = 3000,
    num_neg: int = 3000,
    num_folds: int = 10,
    seed: int = 0,
) -> PairSet:
    """Verification pairs drawn from labelled (held-out) data, in LFW's fold layout.

    Draws ``num_pos`` distinct genuine pairs uniformly among all same-label pairs and ``num_neg``
    distinct impostor pairs uniformly among all different-label pairs, as indices ``i < j`` into
    ``labels``; no pair appears twice. Folds are balanced: fold ``f`` gets ``num_pos / num_folds``
    genuine and ``num_neg / num_folds`` impostor pairs (sizes differ by at most one when the division
    is not exact), and the pairs are ordered fold by fold, genuine pairs first, as in pairs.txt.
    Deterministic given ``seed``.

    Args:
        labels: ``(N,)`` class labels (any integer or string values).
        num_pos: genuine pairs to draw.
        num_neg: impostor pairs to draw.
        num_folds: cross-validation folds.
        seed: random seed.

    Raises:
        DataError: fewer distinct genuine/impostor pairs exist than requested (the message says how many).

    Example:
        >>> ps = make_pairs_from_labels([0, 0, 1, 1, 2, 2], num_pos=3, num_neg=6, num_folds=3)
        >>> len(ps), ps.num_genuine, bool((ps.i < ps.j).all()), ps.folds.tolist()
        (9, 3, True, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    """
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if values.ndim != 1 or values.shape[0] < 2:
        raise DataError(f"labels must be 1-D with at least 2 entries; got shape {values.shape}")
    for name, value in (("num_pos", num_pos), ("num_neg", num_neg), ("num_folds", num_folds)):
        if int(value) != value or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    if num_folds > min(num_pos, num_neg):
        raise ConfigError(
            f"num_folds={num_folds} exceeds num_pos={num_pos} or num_neg={num_neg}: every fold needs both kinds"
        )
    _, codes = np.unique(values, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    n = sorted_codes.shape[0]
    # end (exclusive) of the block of equal labels containing each sorted position
    block_end = np.searchsorted(sorted_codes, sorted_codes, side="right")
    positions = np.arange(n)
    pos_counts = block_end - positions - 1  # same label, later position
    neg_counts = n - block_end  # different label, later block
    available_pos, available_neg = int(pos_counts.sum()), int(neg_counts.sum())
    if num_pos > available_pos or num_neg > available_neg:
        raise DataError(
            f"asked for {num_pos} genuine and {num_neg} impostor pairs but these labels give only "
            f"{available_pos} distinct genuine and {available_neg} distinct impostor pairs"
        )
    rng = np.random.default_rng(seed)
    pa, pb = _sample_pairs(rng, pos_counts, positions + 1, num_pos)
    na, nb = _sample_pairs(rng, neg_counts, block_end, num_neg)

    def as_indices(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = order[a], order[b]
        return np.minimum(x, y), np.maximum(x, y)

    pi, pj = as_indices(pa, pb)
    ni, nj = as_indices(na, nb)
    pos_fold = contiguous_folds(num_pos, num_folds)
    neg_fold = contiguous_folds(num_neg, num_folds)
    i_parts, j_parts, same_parts, fold_parts = [], [], [], []
    for fold in range(num_folds):
        p, q = pos_fold == fold, neg_fold == fold
        i_parts += [pi[p], ni[q]]
        j_parts += [pj[p], nj[q]]
        same_parts += [np.ones(int(p.sum()), bool), np.zeros(int(q.sum()), bool)]
        fold_parts += [np.full(int(p.sum() + q.sum()), fold, np.int64)]
    return PairSet(
        same=np.concatenate(same_parts),
        folds=np.concatenate(fold_parts),
        i=np.concatenate(i_parts),
        j=np.concatenate(j_parts),
    )
