"""Response models of the search service (they document ``/openapi.json`` and ``/docs``)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

__all__ = ["HealthOut", "InfoOut", "ItemOut", "NeighbourOut", "QueryOut", "SearchOut"]


class HealthOut(BaseModel):
    """Liveness."""

    status: str
    items: int
    dim: int
    metric: str
    backend: str
    image_search: bool


class InfoOut(BaseModel):
    """What the index holds and the service's limits."""

    items: int
    dim: int
    metric: str
    backend: str
    backend_params: dict[str, Any]
    image_search: bool
    image_search_error: Optional[str] = None
    model_fingerprint: Optional[str] = None
    input_shape: Optional[list[int]] = None
    class_names: Optional[list[str]] = None
    data: Optional[str] = None
    split: Optional[str] = None
    thumbnails: bool
    max_k: int
    max_upload_bytes: int


class ItemOut(BaseModel):
    """A stored item."""

    id: int
    label: Optional[int] = Field(None, description="class id; null when the item has no label")
    label_name: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    thumbnail_url: Optional[str] = Field(None, description="null when the index stores no thumbnails")


class NeighbourOut(ItemOut):
    """One search result."""

    rank: int
    distance: float = Field(description="smaller = closer (euclidean, cosine distance, or negated inner product)")
    correct: Optional[bool] = Field(None, description="label equals the query's label; null when either is unknown")


class QueryOut(BaseModel):
    """What was searched for."""

    type: str = Field(description="'image', 'vector' or 'item'")
    id: Optional[int] = None
    label: Optional[int] = None
    label_name: Optional[str] = None
    filename: Optional[str] = None
    thumbnail_url: Optional[str] = None


class SearchOut(BaseModel):
    """The k nearest neighbours of a query, best first."""

    query: QueryOut
    k: int
    metric: str
    backend: str
    results: list[NeighbourOut]
