"""The resolved recipe as a tree of typed, frozen objects.

``scott.config.load_recipe`` / ``resolve_recipe`` return a :class:`Recipe`: one frozen section
object per schema section (:class:`DataConfig`, :class:`ModelConfig`, :class:`MaskConfig`,
:class:`ObjectiveConfig`, :class:`OptimConfig`, :class:`TrainConfig`). The section classes are
generated from ``scott.config.SCHEMA``, the one place where keys, types, defaults and
constraints live; nothing downstream re-defaults a key.

Sections read as attributes (``recipe.model.img_size``) and, for code and files that speak
mappings, as read-only mappings (``recipe["model"]["img_size"]``, ``dict(recipe.model)``,
``**recipe.model``); a section compares equal to a dict with the same keys and values. Nothing
can be assigned: derive a changed recipe with :meth:`Recipe.with_overrides` (the ``--set``
path, every check rerun) and turn it into plain data with :meth:`Recipe.to_dict`.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Iterable, Iterator

from scott.config import SCHEMA, Field

__all__ = ["Section", "Recipe", "SECTION_TYPES", "DataConfig", "ModelConfig", "MaskConfig",
           "ObjectiveConfig", "OptimConfig", "TrainConfig"]

_KIND_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "pair": list[float],
               "int_list": list[int], "tokenizer": str | list}


def _annotation(spec: Field):
    if spec.kind == "choice":
        kinds = {type(c) for c in spec.choices}
        base = kinds.pop() if len(kinds) == 1 else Any
    else:
        base = _KIND_TYPES[spec.kind]
    return base | None if spec.nullable else base


class _FieldsMapping(Mapping):
    """The read-only Mapping protocol over a dataclass's fields (keys = field names)."""

    _KEY_PREFIX = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{self._KEY_PREFIX}{key}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    __hash__ = None  # equal by value and holding lists: not hashable


class Section(_FieldsMapping):
    """Base of the frozen recipe sections: attribute access plus the read-only Mapping protocol."""

    SECTION = ""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self) == dict(other)
        return NotImplemented

    def to_dict(self) -> dict:
        """A plain (deep-copied) dict of the section."""
        return copy.deepcopy(dict(self))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.items())
        return f"{type(self).__name__}({inner})"


def _section_class(section: str, fields: Mapping[str, Field]) -> type[Section]:
    name = f"{section.capitalize()}Config"
    specs = [(key, _annotation(spec),
              dataclasses.field(default_factory=(lambda d=spec.default: copy.deepcopy(d)),
                                metadata={"spec": spec}))
             for key, spec in fields.items()]
    cls = dataclasses.make_dataclass(name, specs, bases=(Section,), frozen=True, eq=False,
                                     namespace={"SECTION": section, "_KEY_PREFIX": f"{section}.", "__module__": __name__,
                                                "__doc__": f"The validated ``{section}`` section of a recipe "
                                                           f"(keys and defaults: ``scott.config.SCHEMA['{section}']``)."})
    return cls


SECTION_TYPES: dict[str, type[Section]] = {section: _section_class(section, fields) for section, fields in SCHEMA.items()}
DataConfig = SECTION_TYPES["data"]
ModelConfig = SECTION_TYPES["model"]
MaskConfig = SECTION_TYPES["mask"]
ObjectiveConfig = SECTION_TYPES["objective"]
OptimConfig = SECTION_TYPES["optim"]
TrainConfig = SECTION_TYPES["train"]


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe(_FieldsMapping):
    """A complete, validated recipe (built by ``scott.config.resolve_recipe``)."""

    name: str
    data: DataConfig
    model: ModelConfig
    mask: MaskConfig
    objective: ObjectiveConfig
    optim: OptimConfig
    train: TrainConfig

    @classmethod
    def from_resolved(cls, resolved: Mapping[str, Any]) -> "Recipe":
        """Wrap the nested dict ``resolve_recipe`` has already completed and checked."""
        return cls(name=resolved["name"], **{s: SECTION_TYPES[s](**resolved[s]) for s in SCHEMA})

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in other.items()}
        return NotImplemented

    def to_dict(self) -> dict:
        """Plain nested dicts (JSON / YAML ready)."""
        return {"name": self.name, **{s: self[s].to_dict() for s in SCHEMA}}

    def with_overrides(self, overrides: Iterable[str] = (), check_data: bool = False) -> "Recipe":
        """A new recipe with ``"section.key=value"`` overrides applied and every check rerun."""
        from scott.config import resolve_recipe

        return resolve_recipe(self.to_dict(), source=f"<recipe {self.name}>", overrides=list(overrides),
                              check_data=check_data, name=self.name)
