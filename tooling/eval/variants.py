"""What the eval compares: variants of the service's configuration (model file x long-text
mode x index-time pruning), by name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LongText = Literal["chunk", "truncate", "passages"]
LONG_TEXT_MODES: tuple[LongText, ...] = ("chunk", "truncate", "passages")


@dataclass(frozen=True)
class Variant:
    name: str
    model_file: str | None = None  # None: the folder's model.onnx (INT8)
    long_text: LongText | None = None  # None: the service's default
    prune_below: float = 0.0
    window_tokens: int | None = None  # None: the service's default; 0: all the model takes


def default_variants(fp32_file: str | None, prunes: Sequence[float] = (0.1, 0.3)) -> list[Variant]:
    out = [Variant("int8")]
    if fp32_file:
        out.append(Variant("fp32", model_file=fp32_file))
    out.append(Variant("int8-truncate", long_text="truncate"))
    out += [Variant(f"int8-prune{p:g}", prune_below=p) for p in prunes if p > 0]
    return out


def long_text_variant(name: str) -> Variant | None:
    """``int8-<mode>[<window tokens>]`` (``int8-passages256``; ``int8-chunk``: windows of all
    the model takes), else None."""
    for mode in LONG_TEXT_MODES:
        rest = name.removeprefix(f"int8-{mode}")
        if rest != name and (rest == "" or rest.isdigit()):
            return Variant(name, long_text=mode, window_tokens=int(rest) if rest else 0)
    return None


def select_variants(
    fp32_file: str | None, prunes: Sequence[float], names: str | None
) -> list[Variant]:
    prunes = list(prunes)
    wanted = [n.strip() for n in names.split(",")] if names else None
    if wanted:
        prunes += [
            float(n.removeprefix("int8-prune")) for n in wanted if n.startswith("int8-prune")
        ]
    variants = default_variants(fp32_file, sorted(set(prunes)))
    if wanted is None:
        return variants
    by_name = {v.name: v for v in variants}
    for n in wanted:
        extra = long_text_variant(n)
        if extra is not None and n not in by_name:
            by_name[n] = extra
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(
            f"sparse-ingest eval: unknown variant(s) {unknown}; known: {list(by_name)}"
        )
    return [by_name[n] for n in wanted]
