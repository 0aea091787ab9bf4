"""Turning queries into embeddings: images through a checkpoint's model, vectors from ``.npz``/``.npy`` files.

An image is decoded with Pillow, converted to the model's input (grayscale or RGB and the
``input_shape`` recorded in the checkpoint, resized bilinearly), scaled to ``[0, 1]`` and normalised
with the training data's mean/std (recorded in the index manifest when it was built from a
checkpoint, else taken from the checkpoint's data info) — exactly as the indexed items were.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deepmetric.errors import DataError
from deepmetric.index.errors import SearchIndexError

__all__ = ["QueryEncoder", "decode_image", "load_query_vectors", "MAX_IMAGE_PIXELS"]

#: Largest image (width × height) accepted as a query; bigger ones are refused before decoding.
MAX_IMAGE_PIXELS = 40_000_000
_VECTOR_KEYS = ("embeddings", "features", "vectors", "queries")


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Decode image bytes (any format Pillow reads) into a loaded ``PIL.Image``.

    Raises:
        DataError: not an image, truncated or corrupt, or larger than ``max_pixels``.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DataError("the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels or width < 1 or height < 1:
                raise DataError(f"image of {width}×{height} pixels refused (at most {max_pixels} pixels)")
            image.load()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        raise DataError(f"cannot decode the file as an image: {exc}") from exc
    return image


def load_query_vectors(path: str | Path) -> np.ndarray:
    """Query vectors from ``.npy`` or ``.npz`` (key ``embeddings``, ``features``, ``vectors`` or ``queries``,
    or its only array), as float32 ``(Q, D)`` (a 1-D array is one query).

    Raises:
        DataError: missing or unreadable file, no usable array, not numeric.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"query file {str(p)!r} not found")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            array = loaded
        else:
            with loaded:
                key = next((k for k in _VECTOR_KEYS if k in loaded.files), None)
                if key is None and len(loaded.files) == 1:
                    key = loaded.files[0]
                if key is None:
                    raise DataError(f"{str(p)!r} holds {sorted(loaded.files)}; put the queries under one of "
                                    f"{', '.join(_VECTOR_KEYS)}")
                array = loaded[key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {str(p)!r} as .npy/.npz: {exc}") from exc
    if array.dtype.kind not in "iuf":
        raise DataError(f"{str(p)!r}: query vectors must be numeric; got dtype {array.dtype}")
    array = array.reshape(1, -1) if array.ndim == 1 else array
    if array.ndim != 2:
        raise DataError(f"{str(p)!r}: query vectors must be (Q, D); got shape {array.shape}")
    return array.astype(np.float32)


class QueryEncoder:
    """A checkpoint's model with the preprocessing of its training data: images → embeddings.

    Args:
        checkpoint: a deepmetric checkpoint (``best.pt`` / ``last.pt``).
        device: torch device.
        provenance: an index's :attr:`~deepmetric.index.Index.provenance`; its ``mean``/``std`` and
            ``input_shape`` are used when present, and its ``model_fingerprint`` must match the model.

    Attributes:
        fingerprint: ``model_fingerprint(model, include_weights=True)`` of the loaded model.
        input_shape, kind, mean, std: the model's input and normalisation.

    Raises:
        CheckpointError: unreadable checkpoint.
        SearchIndexError: the checkpoint's model is not the one the index was built with.
    """

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu",
                 provenance: dict[str, Any] | None = None) -> None:
        from deepmetric.models import model_fingerprint
        from deepmetric.train import load_model_from_checkpoint

        self.model, self.config, ckpt = load_model_from_checkpoint(checkpoint, device)
        self.device = torch.device(device)
        self.checkpoint = str(checkpoint)
        self.fingerprint = model_fingerprint(self.model, include_weights=True)
        provenance = provenance or {}
        expected = provenance.get("model_fingerprint")
        if expected and expected != self.fingerprint:
            raise SearchIndexError(
                f"checkpoint {str(checkpoint)!r} holds another model than the index was built with: model "
                f"fingerprint {self.fingerprint}, index built with {expected}. Use the checkpoint recorded in the "
                "index manifest or rebuild the index with this one."
            )
        meta = ckpt.get("data", {}) or {}
        info = meta.get("info", {}) or {}
        self.kind: str = str(provenance.get("kind") or meta.get("kind", "image"))
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in (provenance.get("input_shape")
                                                                   or meta.get("input_shape", (1, 28, 28))))
        mean = provenance.get("mean", info.get("mean"))
        std = provenance.get("std", info.get("std"))
        self.mean: list[float] | None = [float(v) for v in mean] if mean is not None else None
        self.std: list[float] | None = [float(v) for v in std] if std is not None else None

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → a normalised float32 batch ``(B, *input_shape)``.

        Raises:
            DataError: the model takes vectors, not images.
        """
        from PIL import Image

        if self.kind != "image" or len(self.input_shape) != 3:
            raise DataError(f"this model takes {self.kind} inputs of shape {self.input_shape}, not images; "
                            "search with a vector instead")
        channels, height, width = self.input_shape
        arrays = []
        for image in images:
            converted = image.convert("L" if channels == 1 else "RGB")
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.BILINEAR)
            array = np.asarray(converted, dtype=np.float32) / 255.0
            arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, *self.input_shape))
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return x

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """Embeddings ``(B, dim)`` of PIL images."""
        x = self.preprocess(images).to(self.device)
        return self.model(x).float().cpu().numpy()

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Embedding ``(1, dim)`` of an encoded image file (see :func:`decode_image` for the errors)."""
        return self.encode_images([decode_image(data)])

    def encode_file(self, path: str | Path) -> np.ndarray:
        """Embedding ``(1, dim)`` of an image file."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"query image {str(p)!r} not found")
        return self.encode_bytes(p.read_bytes())

    @classmethod
    def for_index(cls, index: Any, checkpoint: str | Path | None = None,
                  device: str | torch.device = "cpu") -> QueryEncoder:
        """The encoder of ``index``: ``checkpoint`` or the one recorded in its manifest, fingerprint-checked.

        Raises:
            SearchIndexError: no checkpoint given nor recorded, or the recorded one is missing.
        """
        path = checkpoint or index.provenance.get("checkpoint")
        if not path:
            raise SearchIndexError("this index records no checkpoint (it was not built from one): "
                                   "pass --checkpoint to search it with images, or search with vectors")
        if checkpoint is None and not Path(path).is_file():
            raise SearchIndexError(f"the checkpoint recorded in the index, {str(path)!r}, does not exist any more; "
                                   "pass --checkpoint")
        return cls(path, device=device, provenance=index.provenance)
